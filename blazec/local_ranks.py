"""Run a function on W gloo ranks on this machine, one process each.

Used by ``blazec dump --expert-parallel N``, ``benchmarks/ep_pipeline.py`` and the distributed
tests: spawn the processes, give each a gloo process group, call ``fn(rank, world, *args)``,
wait for every rank, tear the group down.

The ranks meet through a file store in a fresh temporary directory, not a TCP port: a port
found free by the parent can be taken by another process before rank 0 binds it, which
fails (or hangs) a spawn when several run at once, as the test suite's workers do.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any, Callable


def _entry(rank: int, world: int, store: str, threads: int | None, timeout_s: float,
           fn: Callable[..., Any], args: tuple) -> None:
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store}",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., Any], world: int, *args: Any, threads: int | None = None,
               timeout_s: float = 300, join: bool = True):
    """``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; ``fn`` must be picklable.

    ``threads`` sets each rank's torch thread count. With ``join=True`` this returns when all
    ranks finish and re-raises a rank's error (``torch.multiprocessing.ProcessRaisedException``);
    with ``join=False`` it returns the ``ProcessContext`` to join.
    """
    import torch.multiprocessing as mp

    tmp = tempfile.TemporaryDirectory(prefix="blazec-gloo-")
    store = os.path.join(tmp.name, "store")
    if join:
        with tmp:
            return mp.spawn(_entry, args=(world, store, threads, timeout_s, fn, args), nprocs=world, join=True)
    ctx = mp.spawn(_entry, args=(world, store, threads, timeout_s, fn, args), nprocs=world, join=False)
    ctx.blazec_store_dir = tmp  # removed when the context is collected
    return ctx


def join_within(ctx, seconds: float) -> bool:
    """Join a ``join=False`` context; past ``seconds`` kill what still runs and return False.

    A rank's error is re-raised as by ``ProcessContext.join``.
    """
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            return False
    return True
