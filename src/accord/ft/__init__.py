"""The fault-tolerant mode on torchft: membership and its communicator, the launcher, the worker
loop.
"""
