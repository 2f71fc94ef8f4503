"""Exchanges that run beside the training step: the background engine, its rounds and weighting.
"""
