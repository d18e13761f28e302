"""Spawn tiny gloo process groups for the runtime tests (a helper module, not a test file).

Workers are module-level functions of the test modules; spawned children import those
modules by name, which works because pytest put this directory on sys.path and spawn passes
sys.path on to the children. The spawning itself is ``blazec.local_ranks``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from blazec.local_ranks import join_within, spawn_gloo


def run_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; fail on error or hang.

    An assertion error in any child is re-raised here (torch.multiprocessing reports it with
    the child's traceback); past ``timeout`` seconds the children are killed and the test fails.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # one thread per rank: the 2-core machine must not be oversubscribed
    ctx = spawn_gloo(fn, world, *args, threads=1, timeout_s=30, join=False)
    if not join_within(ctx, timeout):
        raise TimeoutError(f"gloo workers did not finish within {timeout} s")
