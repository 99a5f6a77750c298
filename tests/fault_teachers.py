"""Teachers for fault tests: the toy teacher made slow, so a run holds its stage lock long enough to be met
by a second run (importable by CLI subprocesses: tests/ goes on their PYTHONPATH)."""
from __future__ import annotations

import os
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


def make_disk_filling_toy_teacher(device="cpu", fill: str = "", **kwargs):
    """The toy teacher that fills the filesystem of `fill` (a file it creates) at its first velocity call: the
    shard computed next meets a full disk when it is written, after the store and plan were made. It fills
    once (`fill`.once marks it), so a rerun after the filler is removed runs normally."""
    teacher = make_toy_teacher(device=device, **kwargs)
    velocity = teacher.velocity

    def filling(*args, **kw):
        if not os.path.exists(fill + ".once"):
            open(fill + ".once", "w").close()
            fd = os.open(fill, os.O_WRONLY | os.O_CREAT)
            for size in (65536, 1):          # big blocks, then the last partial block
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
            os.close(fd)
        return velocity(*args, **kw)

    teacher.velocity = filling
    return teacher
