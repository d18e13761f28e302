"""BalancedBatchSampler under 2 and 4 gloo processes: disjoint, covering, deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from blazec.runtime.balance import BalancedBatchSampler, CostModel
from runtime_dist_util import run_gloo

N, B, MICRO, SEED = 61, 16, 2, 11


def _lengths():
    g = torch.Generator().manual_seed(SEED)
    p = torch.arange(1, 257, dtype=torch.float64).pow(-1.2)
    return torch.multinomial(p / p.sum(), N, replacement=True, generator=g) + 1


def _run(sampler):
    batches = list(sampler)
    return [batches[i : i + sampler.micro_batches] for i in range(0, len(batches), sampler.micro_batches)]


def _worker(rank, world):
    L = _lengths()
    model = CostModel.transformer(64)
    # Lengths known up front: no communication; cost_fn: one all_gather per step, here with
    # the partition of the next step computed on the background thread.
    known = BalancedBatchSampler(N, B, lengths=L, cost_model=model, micro_batches=MICRO, seed=SEED)
    gathered = BalancedBatchSampler(
        N, B, cost_fn=lambda i: model([L[i]]).item(), micro_batches=MICRO, seed=SEED, prefetch=True
    )
    assert (known.rank, known.world_size) == (rank, world)
    mine_known = _run(known)
    mine_gathered = _run(gathered)
    assert mine_gathered == mine_known
    assert _run(known) == mine_known, "a second pass over the same epoch must repeat it"

    everyone = [None] * world
    dist.all_gather_object(everyone, mine_known)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED)).tolist()
    steps = N // B
    single = BalancedBatchSampler(N, B, lengths=L, cost_model=model, rank=0, world_size=world, micro_batches=MICRO, seed=SEED)
    for s in range(steps):
        shares = [everyone[r][s] for r in range(world)]
        flat = [i for share in shares for mb in share for i in mb]
        assert len(flat) == len(set(flat)) == B, "rank shares must be disjoint"
        assert sorted(flat) == sorted(order[s * B : (s + 1) * B]), "rank shares must cover the global batch"
        assert all(len(share) == MICRO and all(share) for share in shares)
        assert shares == single.step_partition(s), "must equal the single-process partition"

    known.set_epoch(1)
    assert _run(known) != mine_known

    # A failing cost_fn on one rank raises on every rank instead of hanging the others.
    def bad(i):
        if rank == world - 1:
            raise RuntimeError("unreadable sample")
        return 1.0

    broken = BalancedBatchSampler(N, B, cost_fn=bad, seed=SEED)
    with pytest.raises(ValueError, match="cost_fn failed for sample"):
        list(broken)


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_under_gloo(world):
    run_gloo(_worker, world)
