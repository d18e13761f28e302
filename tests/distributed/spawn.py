"""Run a test function on W gloo ranks in spawned processes, failing (not hanging) on errors.

The ranks of each world size are spawned once per pytest worker and then run one test after
another (a pool). A freshly spawned rank spends seconds importing torch and warming Dynamo up
before its first check, and on the 2-core CI machine that was much of a distributed test's
time. Each test starts in the ranks as it would in the main process (tests/conftest.py): a
fresh Dynamo cache and seed 0. A test that fails or hangs kills its pool, so the next one
starts from fresh processes, and no test sees what a failed one left behind.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import time
import traceback

import pytest

from blazec.local_ranks import join_within, spawn_gloo


def _serve(rank: int, world: int, tasks, results) -> None:
    """A pool rank: run each pickled ``(fn, args)`` from ``tasks[rank]`` until ``None``; report to ``results``."""
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    import torch
    import torch.distributed as dist

    parent = os.getppid()
    while True:
        try:
            task = tasks[rank].get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the pytest worker is gone (killed): no orphaned ranks
                return
            continue
        if task is None:
            return
        fn, args = pickle.loads(task)
        torch._dynamo.reset()
        torch.manual_seed(0)
        try:
            fn(rank, world, *args)
            dist.barrier()  # every rank is done with this test before any starts the next
        except BaseException:
            results.put((rank, traceback.format_exc()))
            raise  # the rank exits (its peers may wait in a collective): the parent kills the pool
        results.put((rank, None))


class _Pool:
    def __init__(self, world: int):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        # one thread per rank: W processes share the CI machine's cores
        self.procs = spawn_gloo(_serve, world, self.tasks, self.results, threads=1, timeout_s=120, join=False)

    def run(self, fn, args: tuple, deadline: float) -> str | None:
        """Run ``fn`` on every rank; None when all succeed, else why not."""
        task = pickle.dumps((fn, args))  # once, and here: a queue pickles in a thread and drops what fails
        for q in self.tasks:
            q.put(task)
        done: set[int] = set()
        end = time.monotonic() + deadline
        while len(done) < self.world:
            try:
                rank, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs.processes) if p.exitcode is not None]
                if dead:
                    try:  # the error a rank raised outside a test (torch's spawn wrapper keeps it)
                        self.procs.join(timeout=0.1)
                    except Exception as e:  # noqa: BLE001 - reported, with the exit codes
                        return f"rank(s) exited without a result (rank, exit code): {dead}:\n{e}"
                    return f"rank(s) exited without a result (rank, exit code): {dead}"
                if time.monotonic() > end:
                    return f"{self.world}-rank gloo run did not finish in {deadline:.0f}s (hang?)"
                continue
            if error is not None:
                return f"rank {rank} of {self.world} failed:\n{error}"
            done.add(rank)
        return None

    def close(self, wait: float = 30.0) -> None:
        if all(p.is_alive() for p in self.procs.processes):
            for q in self.tasks:
                q.put(None)
            try:
                join_within(self.procs, wait)
            except Exception:  # noqa: BLE001 - closing: a rank's late error changes nothing
                pass
        for p in self.procs.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def run_ranks(fn, world: int, *args, deadline: float = 300) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; a raised error fails the test."""
    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = _Pool(world)
    error = pool.run(fn, args, deadline)
    if error is not None:
        del _POOLS[world]
        pool.close(wait=0)
        pytest.fail(error, pytrace=False)
