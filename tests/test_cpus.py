"""usable_cpus follows the process's CPU affinity (taskset, Slurm, cpusets), not the machine's count."""
import os
import subprocess
import sys

import pytest

from pipeline.cpus import usable_cpus


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity call on this OS")
def test_usable_cpus_is_the_affinity_not_the_machine_count():
    # A child pinned to one core sees 1, whatever the machine has (os.cpu_count() would say all).
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pipeline.cpus import usable_cpus; print(usable_cpus(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    usable, machine = map(int, out.stdout.split())
    assert usable == 1 and machine == os.cpu_count()
    assert usable_cpus() == len(os.sched_getaffinity(0))
