"""Run a test function on W gloo ranks in spawned processes, failing (not hanging) on errors."""

from __future__ import annotations

import os

import pytest

from blazec.local_ranks import join_within, spawn_gloo


def _test_rank(rank: int, world: int, fn, args) -> None:
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    fn(rank, world, *args)


def run_ranks(fn, world: int, *args, deadline: float = 300) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; a raised error fails the test."""
    # one thread per rank: W processes share the CI machine's cores
    ctx = spawn_gloo(_test_rank, world, fn, args, threads=1, timeout_s=120, join=False)
    if not join_within(ctx, deadline):
        pytest.fail(f"{world}-rank gloo run did not finish in {deadline:.0f}s (hang?)")
