"""The Triton routing index build against ``reference.moe_route``: bit-identical outputs.

Under the interpreter a block holds 16 priority positions, so most cases span several blocks
and exercise the cross-block prefix scan.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blazec.ops import reference as ref
from tests.kernels.cases import make_ids
from tests.kernels.conftest import KERNEL_DEVICE


def check(ids: torch.Tensor, E: int, capacity: int, priority: str) -> None:
    from blazec.kernels.moe_route import moe_route

    ids = ids.to(KERNEL_DEVICE)
    got = moe_route(ids, E, capacity, priority)
    want = ref.moe_route(ids.long(), E, capacity, priority)
    for name, g, w in zip(("sorted_pairs", "expert_offsets", "pair_pos"), got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape and g.is_contiguous(), name
        assert torch.equal(g.cpu(), w.cpu()), f"{name}: {g.tolist()} != {w.tolist()}"


@pytest.mark.parametrize("priority", ["token", "slot"])
@pytest.mark.parametrize("capacity", [-1, 0, 1, 3, 1000])
@pytest.mark.parametrize("kind", ["uniform", "ragged", "empty_experts", "one_expert"])
def test_kinds(kind: str, capacity: int, priority: str) -> None:
    gen = torch.Generator().manual_seed(hash((kind, capacity, priority)) % 2**31)
    check(make_ids(37, 3, 7, kind, gen), 7, capacity, priority)


@pytest.mark.parametrize("k", range(1, 9))
def test_top_k(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    check(make_ids(23, k, 9, "ragged", gen), 9, 5, "slot")
    check(make_ids(23, k, 9, "ragged", gen), 9, -1, "token")


@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (1, 8, 8), (1, 2, 64), (200, 2, 3), (33, 4, 130)])
def test_shapes(T: int, k: int, E: int) -> None:
    gen = torch.Generator().manual_seed(T * 1000 + E)
    check(make_ids(T, k, E, "uniform", gen), E, -1, "token")
    check(make_ids(T, k, E, "uniform", gen), E, max(1, T * k // E), "slot")


def test_more_experts_than_a_block_holds_take_the_reference() -> None:
    """E > 2**20 needs a scan block past Triton's largest (the kernel failed inside Triton);
    the op's contract is E < 2**31. The reference takes it."""
    E = 2**20 + 1
    ids = torch.tensor([[0, E - 1], [5, E - 1]], device=KERNEL_DEVICE)
    check(ids, E, 1, "token")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_id_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    check(make_ids(19, 2, 5, "ragged", gen).to(dtype), 5, 4, "slot")


@pytest.mark.parametrize("capacity", [-1, 2])
@pytest.mark.parametrize("priority", ["token", "slot"])
def test_uint8_ids_with_256_experts(capacity: int, priority: str) -> None:
    """The last block's padding lanes must not count as an expert: loaded as ``other=-1`` they
    wrapped to 255 in uint8, a real expert once E > 255 (expert_offsets[E] was 16 for 10 pairs,
    and moe_experts then read past sorted_pairs)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (5, 2), generator=gen)
    ids[0, 0] = 255  # expert 255 also has a real pair
    check(ids.to(torch.uint8), 256, capacity, priority)


def test_noncontiguous_ids() -> None:
    gen = torch.Generator().manual_seed(4)
    ids = make_ids(19, 4, 6, "uniform", gen)[:, ::2]
    check(ids, 6, 3, "token")


def test_deterministic() -> None:
    from blazec.kernels.moe_route import moe_route

    ids = make_ids(50, 4, 5, "ragged", torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    a = moe_route(ids, 5, 7, "slot")
    b = moe_route(ids, 5, 7, "slot")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 40),
    k=st.integers(1, 8),
    E=st.integers(1, 20),
    capacity=st.sampled_from([-1, 0, 1, 2, 5, 100]),
    priority=st.sampled_from(["token", "slot"]),
    kind=st.sampled_from(["uniform", "ragged", "empty_experts", "one_expert"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(T, k, E, capacity, priority, kind, seed) -> None:
    check(make_ids(T, k, E, kind, torch.Generator().manual_seed(seed)), E, capacity, priority)


# On a GPU a failed device-side assert ends the process's CUDA context, so these run under the
# interpreter only (the CPU's _assert_async raises at once).
interpreter_only = pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="a device-side assert ends the CUDA context")


@interpreter_only
@pytest.mark.parametrize("bad", [-1, 7, 2**32 + 3])
def test_ids_out_of_range_fail_in_the_kernel(bad: int) -> None:
    """The kernel checks the id range itself (row E of the counts, the scan's flag, one
    ``_assert_async``); 2**32 + 3 would be expert 3 after the kernel's int32 cast."""
    from blazec.kernels.moe_route import moe_route

    ids = make_ids(40, 2, 7, "uniform", torch.Generator().manual_seed(6))
    ids[37, 1] = bad  # in the last block
    with pytest.raises(RuntimeError, match=r"topk_ids must lie in \[0, num_experts=7\)"):
        moe_route(ids, 7, -1, "token")


@interpreter_only
def test_more_experts_than_a_block_holds_still_check_the_id_range() -> None:
    """The op leaves the range check to the kernel impl (CHECKS_ID_RANGE), so its reference
    fallback checks too."""
    from blazec.kernels.moe_route import moe_route

    E = 2**20 + 1
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=1048577\), got values in \[1, 1048577\]"):
        moe_route(torch.tensor([[1, E]]), E, -1, "token")


@interpreter_only
def test_uint8_ids_past_num_experts_fail() -> None:
    from blazec.kernels.moe_route import moe_route

    ids = torch.tensor([[1, 0], [250, 3]], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="topk_ids must lie in"):
        moe_route(ids, 200, 2, "slot")


@interpreter_only
def test_op_leaves_the_range_check_to_the_kernel() -> None:
    """Registered for a device, the kernel's own check replaces the op's (a ValueError on the
    CPU, five launches on a GPU)."""
    from blazec.kernels.moe_route import moe_route
    from blazec.ops import register_impl
    from blazec.ops.route import moe_route as op

    ids = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match=r"got values in \[0, 5\]"):
        op(ids, 5)
    register_impl("moe_route", "cpu", moe_route)
    try:
        with pytest.raises(RuntimeError, match=r"num_experts=5\)"):
            op(ids, 5)
        got = op(torch.tensor([[0, 4], [4, 2]]), 5)
    finally:
        register_impl("moe_route", "cpu", None)
    want = ref.moe_route(torch.tensor([[0, 4], [4, 2]]), 5, -1, "token")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
