"""How many cores this process may use (no torch import, so the command line stays fast to start)."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (what `taskset`, Slurm's `--cpus-per-task`
    or a cpuset container allows), not the machine's count. Threads and worker processes are sized
    from it, since sizing them from `os.cpu_count()` on a 64-core node that lends 4 cores runs 64
    threads on 4 cores. Python 3.13's `os.process_cpu_count` is the same reading; this works on 3.10+."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1
