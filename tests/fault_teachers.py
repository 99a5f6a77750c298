"""Teachers for fault tests: the toy teacher made slow, so a run holds its stage lock long enough to be met
by a second run (importable by CLI subprocesses: tests/ goes on their PYTHONPATH)."""
from __future__ import annotations

import time

from pipeline.teachers.toy import make_toy_teacher


def make_slow_toy_teacher(device="cpu", delay: float = 0.2, **kwargs):
    """The toy teacher whose every velocity call sleeps `delay` seconds (results unchanged)."""
    teacher = make_toy_teacher(device=device, **kwargs)
    velocity = teacher.velocity

    def slow(*args, **kw):
        time.sleep(delay)
        return velocity(*args, **kw)

    teacher.velocity = slow
    return teacher
