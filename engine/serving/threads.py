"""Tensor work of a serving process outside the engine thread runs in a thread that ends with it.

torch's CPU parallelism is OpenMP (libgomp on Linux builds), which keeps a team of worker threads
for every thread that ever ran a parallel region, alive as long as that thread is. Once the teams
together hold more threads than the machine has CPUs, libgomp cuts every team's spin-wait to 100
iterations (`gomp_throttled_spin_count_var`), so each of the engine thread's parallel regions
(hundreds per decode step) has to wake its workers through the kernel. Measured on a 2-core VM,
serving benchmark model, batch 1: a decode step took 20 ms with the model loaded on the main
thread, 14 ms with it loaded in a thread that had ended, 14 ms with everything on one thread;
an encoder pass 155 vs 115 ms. So loading, the CPU kernel probes (the int4 one runs a matmul) and
the server's prompt checks (a cast and a NaN scan, parallel above 32768 values) run through
`in_fresh_thread`, and the engine thread's team is the only one that lives. Anything the event
loop's thread asks of the engine must stay free of parallel tensor work for the same reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(work: Callable[[], T], *, name: str = "cpm2-tensor-work") -> T:
    """Run `work` in a new thread, wait for it, and return its result or raise its exception.

    The calling thread blocks meanwhile; call it from a worker thread, not an event loop, for
    anything longer than a few milliseconds.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller, raised there with its traceback
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
