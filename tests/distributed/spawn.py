"""Run a test function on W gloo ranks in spawned processes, failing (not hanging) on errors."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    import torch

    torch.set_num_threads(1)  # W processes share the CI machine's cores
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, deadline: float = 300) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; a raised error fails the test."""
    ctx = mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=2):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-rank gloo run did not finish in {deadline:.0f}s (hang?)")
