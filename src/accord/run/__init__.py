"""Running a training job: the config (each setting declared once) and its validation, the
launchers, the one loop, records, faults and liveness, resume, the several-hosts testbed.
"""
