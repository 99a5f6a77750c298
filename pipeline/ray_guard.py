"""A local Ray cluster started by flowsteer ends with its driver, even when the driver is killed (kill -9).

`ray.init(address="local")` starts gcs_server, raylet, the dashboard and runtime-env agents and workers as
descendants of the driver. A normal exit (or an exception) shuts them down through ray.shutdown (atexit),
but a killed driver runs nothing, and Ray's own fate-sharing leaves the agents (~180 MB) behind. So right
before ray.init the driver starts a small watchdog in its own session, holding the read end of a pipe only
the driver writes: every second a driver thread sends the list of its descendant processes (pid and start
time, so a reused pid is never hit); when the driver dies, however it dies, the kernel closes the pipe, the
watchdog reads EOF and kills every process it was told of that still runs. What it cannot do: a process
Ray starts in the last second before the kill is not on the list; a watchdog killed with the driver (a
kill of the whole process group, an OOM kill of both) leaves the cluster running, for `ray stop` to end
(docs/reliability.md).
"""
from __future__ import annotations

import json
import subprocess
import sys

_WATCHDOG = r"""
import json, sys
import psutil
known = {}
for line in sys.stdin:                          # ends when the driver is gone (EOF)
    try:
        known.update({int(pid): created for pid, created in json.loads(line)})
    except ValueError:
        pass
procs = []
for pid, created in known.items():
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            procs.append(p)
    except psutil.Error:
        pass
def each(procs, action):                        # a process may end between the listing and the signal
    for p in procs:
        try:
            getattr(p, action)()
        except psutil.Error:
            pass
each(procs, "terminate")
_, alive = psutil.wait_procs(procs, timeout=5)
each(alive, "kill")
"""

_watchdog: subprocess.Popen | None = None


def _descendants(watchdog_pid: int) -> list[tuple[int, float]]:
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid != watchdog_pid:
                out.append((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return out


def _report(watchdog: subprocess.Popen, every: float) -> None:
    """Driver thread: the current descendants to the watchdog, every `every` seconds, until it is gone."""
    import time

    while watchdog.poll() is None:
        try:
            watchdog.stdin.write((json.dumps(_descendants(watchdog.pid)) + "\n").encode())
            watchdog.stdin.flush()
        except (OSError, ValueError):
            return
        time.sleep(every)


def guard_local_cluster(every: float = 1.0) -> subprocess.Popen:
    """Start (once per driver) the watchdog of the Ray processes this process started; returns it."""
    global _watchdog
    import threading

    if _watchdog is not None and _watchdog.poll() is None:
        return _watchdog
    # stdin is the pipe; the driver's end is close-on-exec, so no Ray process inherits it and keeps it open
    _watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    threading.Thread(target=_report, args=(_watchdog, every), daemon=True, name="ray-guard").start()
    return _watchdog
