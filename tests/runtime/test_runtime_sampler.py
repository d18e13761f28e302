"""BalancedBatchSampler in one process (ranks given explicitly) and with a DataLoader."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from blazec.runtime.balance import METHODS, BalancedBatchSampler, CostModel, bubble_fraction
from runtime_dist_util import run_gloo




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
        (dict(data_source=8, global_batch_size=4, cost_fn=float, cost_model=CostModel.tokens()), "cost_model= needs lengths="),
        (dict(data_source=3, global_batch_size=4, lengths=[1] * 3, world_size=2, micro_batches=2, drop_last=False),
         r"dataset size 3 < world_size \* micro_batches = 4"),
        (dict(data_source=4, global_batch_size=2, lengths=[1e200, 1.0, 2.0, 3.0]), r"cost of sample 0 overflows float64 \(lengths\[0\] = 1e\+200"),
        (dict(data_source=2, global_batch_size=2, lengths=[1.0, float("nan")]), r"lengths must be finite and >= 0, got lengths\[1\] = nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedBatchSampler(**kwargs)


def test_bad_cost_fn_value():
    s = BalancedBatchSampler(8, 4, cost_fn=lambda i: -1.0)
    with pytest.raises(ValueError, match=r"cost_fn\(\d\) returned -1.0"):
        list(s)


# --- argument types: rejected at construction, naming the argument ------------------------

_L8 = [5, 1, 7, 3, 2, 9, 4, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=4.0), r"global_batch_size must be an int, got 4.0 \(float\)"),
        (dict(global_batch_size="4"), r"global_batch_size must be an int, got '4' \(str\)"),
        (dict(global_batch_size=True), r"global_batch_size must be an int, got True \(bool\)"),
        (dict(world_size=2.0, rank=0), r"world_size must be an int, got 2.0"),
        (dict(world_size=2, rank=1.0), r"rank must be an int, got 1.0"),
        (dict(seed=0.5), r"seed must be an int, got 0.5"),
        (dict(micro_batches=2.0), r"micro_batches must be an int, got 2.0"),
        (dict(drop_last="no"), r"drop_last must be True or False, got 'no'"),
        (dict(shuffle=1), r"shuffle must be True or False, got 1"),
        (dict(data_source=8.0), r"data_source must be a dataset with len\(\) or its size \(an int\), got 8.0"),
        (dict(lengths=None, cost_fn="len"), "cost_fn must be callable"),
        (dict(cost_model="transformer"), "cost_model must be a CostModel"),
    ],
)
def test_bad_argument_types(kwargs, match):
    args = dict(data_source=8, global_batch_size=4, lengths=_L8) | kwargs
    with pytest.raises(TypeError, match=match):
        BalancedBatchSampler(**args)


def test_numpy_integers_and_bools_are_accepted():
    ref = BalancedBatchSampler(8, 4, lengths=_L8, rank=1, world_size=2, micro_batches=2, seed=3, drop_last=True)
    got = BalancedBatchSampler(
        np.int64(8), np.int32(4), lengths=np.array(_L8), rank=np.int64(1), world_size=np.int64(2),
        micro_batches=np.int16(2), seed=np.uint8(3), drop_last=np.bool_(True),
    )
    assert list(got) == list(ref) and len(got) == len(ref)


def test_any_int_seed_and_epoch_checked():
    # torch's manual_seed only takes [-2**63, 2**64): seed + epoch is reduced mod 2**64.
    assert list(BalancedBatchSampler(8, 4, lengths=_L8, seed=-1)) == list(BalancedBatchSampler(8, 4, lengths=_L8, seed=2**64 - 1))
    assert len(list(BalancedBatchSampler(8, 4, lengths=_L8, seed=2**70))) == 2
    with pytest.raises(TypeError, match="epoch must be an int, got 1.5"):
        BalancedBatchSampler(8, 4, lengths=_L8).set_epoch(1.5)


def test_lengths_are_read_as_float64():
    # float32 would round 16777217 to 16777216 (and overflow above 3.4e38).
    s = BalancedBatchSampler(2, 2, lengths=[16777217.0, 16777216.0], cost_model=CostModel.tokens(), world_size=2, shuffle=False)
    list(s)
    assert sorted(s.last_rank_costs) == [16777216.0, 16777217.0]
    s = BalancedBatchSampler(2, 2, lengths=[1e300, 1e299], cost_model=CostModel.tokens(), world_size=2, shuffle=False)
    list(s)
    assert sorted(s.last_rank_costs) == [1e299, 1e300]


def test_features_must_be_a_mapping():
    with pytest.raises(TypeError, match="features must map each feature name to its per-sample values, got list"):
        BalancedBatchSampler(20, 8, lengths=[1.0] * 20, features=[1, 2])


def test_cost_fn_returning_a_non_number():
    with pytest.raises(TypeError, match=r"cost_fn\(\d\) returned 'x'; it must return a number"):
        list(BalancedBatchSampler(4, 2, cost_fn=lambda i: "x"))
    with pytest.raises(TypeError, match=r"cost_fn\(\d\) returned None"):
        list(BalancedBatchSampler(4, 2, cost_fn=lambda i: None))
    # float() took these: "3" as 3.0, True as 1.0
    for out in ("3", True, torch.tensor(True), torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match=r"cost_fn\(\d\) returned .*; it must return a number"):
            list(BalancedBatchSampler(4, 2, cost_fn=lambda i, out=out: out))
    # numbers as numpy and torch give them
    import numpy as np

    for out in (np.float32(2.5), np.int64(3), torch.tensor(4.0), torch.tensor([5])):
        s = BalancedBatchSampler(4, 2, cost_fn=lambda i, out=out: out, shuffle=False)
        list(s)
        assert s.last_rank_costs == [2 * float(out.item() if hasattr(out, "item") else out)]  # 2 samples a step


# --- drop_last=False: every rank yields len() batches, micro_batches per step, none empty ----


def _epoch(world, n, B, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        samplers = [BalancedBatchSampler(n, B, rank=r, world_size=world, **kw) for r in range(world)]
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("equal", [False, True])
def test_drop_last_false_same_number_of_batches_on_every_rank(method, equal):
    for n, world, micro in itertools.product(range(1, 11), (1, 2, 3), (1, 2, 3)):
        wm = world * micro
        for B in sorted({wm, wm + 1, n - 1, n, n + 2} - set(range(wm))):
            L = [(7 * i) % 5 + 1 for i in range(n)]
            kw = dict(lengths=L, micro_batches=micro, method=method, equal_counts=equal, drop_last=False, seed=n)
            if n < wm:
                with pytest.raises(ValueError, match="no step"):
                    _epoch(world, n, B, **kw)
                continue
            samplers, yielded = _epoch(world, n, B, **kw)
            steps = n // B + (n % B >= wm)
            for s, got in zip(samplers, yielded):
                assert len(got) == len(s) == steps * micro, (n, world, micro, B)
                assert all(got), "no empty micro-batch"
            seen = [i for got in yielded for mb in got for i in mb]
            assert len(seen) == len(set(seen)) == min(n, steps * B)  # short last step: all of it


def test_drop_last_false_keeps_a_short_last_step_that_fits():
    # 10 = 2 * 4 + 2: the 2 left over fill world_size * micro_batches = 2 micro-batches.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, yielded = _epoch(2, 10, 4, lengths=list(range(1, 11)), drop_last=False)
    assert [len(y) for y in yielded] == [3, 3]
    assert sorted(i for y in yielded for mb in y for i in mb) == list(range(10))


def test_drop_last_false_warns_about_a_dropped_remainder():
    # 5 = 4 + 1: one sample cannot go to both ranks; it is dropped, with a warning.
    with pytest.warns(UserWarning, match=r"the last 1 samples of each epoch .* world_size \* micro_batches = 2 and are dropped"):
        s = BalancedBatchSampler(5, 4, lengths=[5, 1, 7, 3, 2], rank=1, world_size=2, drop_last=False)
    assert len(s) == len(list(s)) == 1


# --- cost_fn mode: an explicit rank= must be the process group's (every rank raises) --------


def _rank_mismatch_worker(rank, world):
    # Every process passes rank=0: without the check, both evaluate and keep rank 0's share.
    with pytest.raises(ValueError, match=r"rank= disagrees with the process group: .* passed rank=\[0, 0\]"):
        BalancedBatchSampler(8, 8, cost_fn=float, rank=0, world_size=world)
    ok = BalancedBatchSampler(8, 8, cost_fn=float, rank=rank, world_size=world, shuffle=False)
    mine = [i for mb in ok for i in mb]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    assert sorted(i for m in everyone for i in m) == list(range(8))


@pytest.mark.xdist_group("gloo")
def test_cost_fn_rank_must_match_the_process_group():
    run_gloo(_rank_mismatch_worker, 2)


def test_step_partition_takes_an_int_step():
    s = BalancedBatchSampler(20, 4, lengths=list(range(1, 21)))
    with pytest.raises(TypeError, match=r"step must be an int, got 1.0 \(float\)"):
        s.step_partition(1.0)
    assert s.step_partition(1) == s.step_partition(np.int64(1))
