"""Spawn tiny gloo process groups for the runtime tests (a helper module, not a test file).

Workers are module-level functions of the test modules; spawned children import those
modules by name, which works because pytest put this directory on sys.path and spawn passes
sys.path on to the children.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # 2-core machine: several processes must not oversubscribe it
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; fail on error or hang.

    An assertion error in any child is re-raised here (torch.multiprocessing reports it with
    the child's traceback); past ``timeout`` seconds the children are killed and the test fails.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"gloo workers did not finish within {timeout} s")
