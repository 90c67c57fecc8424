"""`bench.machine.CpuMeter` counts the CPU time of the benchmark's own child processes as its own.

A system under test may run in a child process (`bench.ct2_worker`); its work must not mark the
repetition as contended. No timing is asserted: the child's CPU time, read back from `/proc`, is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.machine import CpuMeter

pytestmark = pytest.mark.skipif(
    not any(Path("/proc/self/task").glob("*/children")), reason="needs /proc/<pid>/task/<tid>/children (Linux)"
)

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\ninput()\n"


def test_live_child_cpu_counts_as_own() -> None:
    before = CpuMeter._own_cpu_s()
    child = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=0.5)], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        # The child is still alive (waiting on stdin) once it has burnt its 0.5 s.
        while CpuMeter._own_cpu_s() - before < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None
        assert CpuMeter._own_cpu_s() - before >= 0.5
    finally:
        child.communicate("\n", timeout=30)
    # Reaped: its time moved to os.times().children_*, and is counted once (twice would be >= 1 s;
    # its interpreter start-up is well under 0.4 s).
    assert 0.5 <= CpuMeter._own_cpu_s() - before < 0.5 + 0.4
