"""BalancedBatchSampler in one process (ranks given explicitly) and with a DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from blazec.runtime.balance import BalancedBatchSampler, CostModel, bubble_fraction




def _lengths(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, 513, dtype=torch.float64).pow(-1.2)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g) + 1


def _shares(world, n, B, **kw):
    """Batches yielded by each rank's sampler, grouped per step."""
    out = []
    for r in range(world):
        s = BalancedBatchSampler(n, B, rank=r, world_size=world, **kw)
        batches = list(s)
        m = s.micro_batches
        out.append([batches[i : i + m] for i in range(0, len(batches), m)])
    return out


@pytest.mark.parametrize("world, micro, equal", [(2, 1, False), (4, 2, False), (4, 2, True), (3, 1, True)])
def test_rank_shares_disjoint_and_cover_each_global_batch(world, micro, equal):
    n, B = 97, 24
    L = _lengths(n)
    shares = _shares(world, n=n, B=B, lengths=L, micro_batches=micro, equal_counts=equal, seed=5)
    ref = BalancedBatchSampler(n, B, lengths=L, rank=0, world_size=world, micro_batches=micro, equal_counts=equal, seed=5)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    steps = n // B
    assert all(len(per_rank) == steps for per_rank in shares)
    for s in range(steps):
        got = [i for r in range(world) for mb in shares[r][s] for i in mb]
        assert sorted(got) == sorted(order[s * B : (s + 1) * B])
        assert len(got) == len(set(got)) == B
        if equal:
            counts = [sum(len(mb) for mb in shares[r][s]) for r in range(world)]
            assert max(counts) - min(counts) <= 1
        assert all(len(shares[r][s]) == micro and all(shares[r][s]) for r in range(world)), "no empty micro-batch"
        assert [shares[r][s] for r in range(world)] == ref.step_partition(s)


def test_deterministic_given_seed_and_epoch():
    L = _lengths(64)
    a = list(BalancedBatchSampler(64, 16, lengths=L, rank=1, world_size=2, seed=3))
    b = list(BalancedBatchSampler(64, 16, lengths=L, rank=1, world_size=2, seed=3))
    c = list(BalancedBatchSampler(64, 16, lengths=L, rank=1, world_size=2, seed=4))
    assert a == b and a != c
    s = BalancedBatchSampler(64, 16, lengths=L, rank=1, world_size=2, seed=3)
    s.set_epoch(1)
    assert list(s) != a


def test_prefetch_and_cost_fn_give_the_same_batches():
    L = _lengths(80, seed=2)
    model = CostModel.transformer(64)
    base = list(BalancedBatchSampler(80, 20, lengths=L, cost_model=model, rank=0, world_size=4, micro_batches=2))
    pre = list(BalancedBatchSampler(80, 20, lengths=L, cost_model=model, rank=0, world_size=4, micro_batches=2, prefetch=True))
    assert pre == base
    # cost_fn without a process group evaluates the whole batch locally (world_size 1 here).
    one = list(BalancedBatchSampler(80, 20, lengths=L, cost_model=model, micro_batches=2))
    via_fn = list(BalancedBatchSampler(80, 20, cost_fn=lambda i: model([L[i]]).item(), micro_batches=2, prefetch=True))
    assert via_fn == one


def test_balance_beats_random_assignment():
    n, B, world = 4096, 1024, 32
    L = _lengths(n, seed=9)
    model = CostModel.transformer(128)
    costs = model(L)
    kk = BalancedBatchSampler(n, B, lengths=L, cost_model=model, world_size=world)
    rnd = BalancedBatchSampler(n, B, lengths=L, cost_model=model, world_size=world, method="random")
    for s in range(n // B):
        b_kk = bubble_fraction([costs[r[0]].sum().item() for r in kk.step_partition(s)])
        b_rnd = bubble_fraction([costs[r[0]].sum().item() for r in rnd.step_partition(s)])
        assert b_kk < 0.1 * b_rnd
    list(kk)
    assert bubble_fraction(kk.last_rank_costs) < 0.05


class _Seqs(Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return torch.full((int(self.lengths[i]),), i)


def test_works_as_dataloader_batch_sampler():
    L = _lengths(50, seed=4)
    ds = _Seqs(L)
    sampler = BalancedBatchSampler(ds, 10, lengths=L, rank=0, world_size=2, micro_batches=2, drop_last=False)
    loader = DataLoader(
        ds, batch_sampler=sampler, collate_fn=lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=-1)
    )
    assert len(loader) == 5 * 2
    seen = []
    for batch in loader:
        seen += [int(row[0]) for row in batch]
    shares = [i for s in range(5) for mb in sampler.step_partition(s)[0] for i in mb]
    assert sorted(seen) == sorted(shares)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data_source=0, global_batch_size=4, lengths=[]), "non-empty dataset"),
        (dict(data_source=8, global_batch_size=4, lengths=[1] * 8, world_size=0), "world_size must be >= 1, got 0"),
        (dict(data_source=8, global_batch_size=4, lengths=[1] * 8, world_size=2, rank=2), r"rank must be in \[0, 2\)"),
        (dict(data_source=8, global_batch_size=4, lengths=[1] * 8, world_size=2, micro_batches=3), "global_batch_size must be >= world_size"),
        (dict(data_source=8, global_batch_size=16, lengths=[1] * 8), "> dataset size 8"),
        (dict(data_source=8, global_batch_size=4), "exactly one of lengths="),
        (dict(data_source=8, global_batch_size=4, lengths=[1] * 7), "one entry per sample"),
        (dict(data_source=8, global_batch_size=4, lengths=[1] * 8, method="best"), "unknown partition method"),
        (dict(data_source=8, global_batch_size=4, cost_fn=float, world_size=2), "needs torch.distributed"),
        (dict(data_source=8, global_batch_size=4, cost_fn=float, features={"x": [1] * 8}), "features= needs lengths="),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedBatchSampler(**kwargs)


def test_bad_cost_fn_value():
    s = BalancedBatchSampler(8, 4, cost_fn=lambda i: -1.0)
    with pytest.raises(ValueError, match=r"cost_fn\(\d\) returned -1.0"):
        list(s)
