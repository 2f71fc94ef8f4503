"""accord inside other training code: the optimizer wrapper, DDP communication hooks, Lightning and
accelerate.
"""
