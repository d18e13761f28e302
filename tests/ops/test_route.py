"""Tests of ``blazec::moe_route`` against a slow pure-Python reference, plus its invariants,
its fake implementation (opcheck) and its argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blazec.ops  # noqa: F401  (registers torch.ops.blazec.*)
from blazec.ops import moe_route


def route_slow(ids: list[list[int]], E: int, capacity: int, priority: str):
    """Pure-Python routing: the obvious loops, no tensors."""
    T = len(ids)
    k = len(ids[0]) if T else 0
    P = T * k
    if priority == "token":
        order = list(range(P))
    else:
        order = sorted(range(P), key=lambda p: (p % k) * T + p // k)
    per_expert: list[list[int]] = [[] for _ in range(E)]
    for p in order:
        per_expert[ids[p // k][p % k]].append(p)
    if capacity >= 0:
        per_expert = [lst[:capacity] for lst in per_expert]
    kept = [p for lst in per_expert for p in lst]
    offsets = [0]
    for lst in per_expert:
        offsets.append(offsets[-1] + len(lst))
    pair_pos = [-1] * P
    for i, p in enumerate(kept):
        pair_pos[p] = i
    return kept + [-1] * (P - len(kept)), offsets, pair_pos


def check_against_slow(ids: torch.Tensor, E: int, capacity: int, priority: str) -> None:
    sp, eo, pp = moe_route(ids, E, capacity, priority)
    T, k = ids.shape
    P = T * k
    for t in (sp, eo, pp):
        assert t.dtype == torch.int64
    assert sp.shape == (P,) and pp.shape == (P,) and eo.shape == (E + 1,)
    ref_sp, ref_eo, ref_pp = route_slow(ids.tolist(), E, capacity, priority)
    assert sp.tolist() == ref_sp
    assert eo.tolist() == ref_eo
    assert pp.tolist() == ref_pp

    # Invariants, independent of the slow reference.
    n = int(eo[-1])
    assert int(eo[0]) == 0 and bool((eo[1:] >= eo[:-1]).all())
    assert bool((sp[n:] == -1).all()) and bool((sp[:n] >= 0).all())
    kept = sp[:n]
    assert torch.equal(pp[kept], torch.arange(n))  # pair_pos inverts sorted_pairs on kept pairs
    assert int((pp >= 0).sum()) == n  # every other pair is dropped
    flat = ids.reshape(-1).long()
    for e in range(E):
        grp = sp[int(eo[e]) : int(eo[e + 1])]
        assert bool((flat[grp] == e).all())
        if capacity >= 0:
            assert grp.numel() <= capacity
        else:
            assert grp.numel() == int((flat == e).sum())


def _ids(kind: str, T: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, E, (T, k), generator=gen)
    if kind == "distinct":  # the usual top-k: k different experts per token
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if kind == "ragged":  # heavily skewed group sizes
        probs = torch.tensor([2.0**-e for e in range(E)])
        return torch.multinomial(probs.expand(T, E), k, replacement=True, generator=gen)
    if kind == "empty_experts":  # only even experts get pairs
        return 2 * torch.randint(0, (E + 1) // 2, (T, k), generator=gen)
    if kind == "one_expert":
        return torch.full((T, k), E - 1, dtype=torch.int64)
    raise AssertionError(kind)


KINDS = ["uniform", "distinct", "ragged", "empty_experts", "one_expert"]


@pytest.mark.parametrize("priority", ["token", "slot"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (1, 4, 8), (7, 2, 4), (33, 3, 5), (16, 8, 8), (64, 1, 16)])
def test_route_matches_slow_reference(priority: str, kind: str, T: int, k: int, E: int) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + k * 10 + E)
    if kind == "distinct" and k > E:
        pytest.skip("k distinct experts need E >= k")
    ids = _ids(kind, T, k, E, gen)
    for capacity in (-1, 0, 1, 3, T * k, T * k + 5):
        check_against_slow(ids, E, capacity, priority)


def test_priorities_differ_under_capacity() -> None:
    # Token 0 sends its slot-1 pair to expert 0; token 1 sends its slot-0 pair there.
    # With capacity 1, "token" keeps pair 1 (token 0), GShard "slot" keeps pair 2 (token 1).
    ids = torch.tensor([[1, 0], [0, 1]])
    sp_tok, eo_tok, pp_tok = moe_route(ids, 2, 1, "token")
    sp_slot, eo_slot, pp_slot = moe_route(ids, 2, 1, "slot")
    assert sp_tok.tolist() == [1, 0, -1, -1]
    assert sp_slot.tolist() == [2, 0, -1, -1]
    assert eo_tok.tolist() == eo_slot.tolist() == [0, 1, 2]
    assert pp_tok.tolist() == [1, 0, -1, -1]
    assert pp_slot.tolist() == [1, -1, 0, -1]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_integer_id_dtypes(dtype: torch.dtype) -> None:
    ids = torch.tensor([[3, 1], [0, 3], [3, 2]], dtype=dtype)
    check_against_slow(ids, 4, 2, "slot")


def test_non_contiguous_ids() -> None:
    ids = torch.randint(0, 6, (4, 9), generator=torch.Generator().manual_seed(0))[:, ::3]
    assert not ids.is_contiguous()
    check_against_slow(ids, 6, 1, "token")


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 40),
    k=st.integers(1, 8),
    E=st.integers(1, 16),
    capacity=st.integers(-1, 12),
    priority=st.sampled_from(["token", "slot"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_route_property(T: int, k: int, E: int, capacity: int, priority: str, seed: int) -> None:
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(seed))
    check_against_slow(ids, E, capacity, priority)


def test_opcheck_route() -> None:
    ids = torch.randint(0, 5, (9, 3), generator=torch.Generator().manual_seed(1))
    for capacity, priority in ((-1, "token"), (2, "slot"), (0, "token")):
        torch.library.opcheck(torch.ops.blazec.moe_route.default, (ids, 5, capacity, priority))


def test_fake_shapes_are_static() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids = torch.empty(11, 3, dtype=torch.int64)
        sp, eo, pp = torch.ops.blazec.moe_route(ids, 6, 2, "slot")
    assert sp.shape == (33,) and eo.shape == (7,) and pp.shape == (33,)
    assert sp.dtype == eo.dtype == pp.dtype == torch.int64


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.tensor([[0, 4]]), 4), r"\[0, num_experts=4\).*\[0, 4\]"),
        ((torch.tensor([[-1, 2]]), 4), r"\[0, num_experts=4\).*\[-1, 2\]"),
        ((torch.tensor([[0.0, 1.0]]), 4), "integer dtype"),
        ((torch.tensor([[True, False]]), 4), "integer dtype"),
        ((torch.tensor([0, 1]), 4), "must be 2-D"),
        ((torch.zeros(2, 1, 1, dtype=torch.int64), 4), "must be 2-D"),
        ((torch.tensor([[0, 1]]), 0), r"num_experts must be in \[1, 2\*\*31\), got 0"),
        ((torch.tensor([[0, 1]]), 2**62), r"num_experts must be in \[1, 2\*\*31\)"),  # was a storage overflow
        ((torch.tensor([[0, 1]]), 4, -2), "capacity"),
        ((torch.tensor([[0, 1]]), 4, -1, "expert"), "priority must be one of"),
    ],
)
def test_route_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        moe_route(*args)


def test_route_integer_arguments() -> None:
    """num_experts=True was taken as 1 (and reported as "num_experts=1"); numpy ints are ints."""
    import numpy as np

    ids = torch.tensor([[0, 1]])
    with pytest.raises(TypeError, match="num_experts must be an int, got True"):
        moe_route(ids, True)
    with pytest.raises(TypeError, match="capacity must be an int, got 1.5"):
        moe_route(ids, 2, 1.5)
    assert torch.equal(moe_route(ids, np.int64(2), np.int32(-1))[1], moe_route(ids, 2)[1])
