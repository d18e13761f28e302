"""The kernels' memory accesses under ``tests/kernels/sanitizer.py``: in bounds, race-free.

The first tests show that the sanitizer catches each kind of bug on small kernels written to
have it; the rest run the routing build and the expert forward and backward launchers on the
kinds of cases the correctness tests use and require every launch to be clean.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import ON_GPU
from tests.kernels.sanitizer import Sanitizer

pytestmark = pytest.mark.skipif(ON_GPU, reason="the sanitizer instruments Triton's interpreter")

if not ON_GPU:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs + SHIFT, mask=m), mask=m)

    @triton.jit
    def _first_of_each(dst, BLOCK: tl.constexpr):  # every program writes dst[0]: a write race
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs * 0, offs.to(tl.float32), mask=offs == offs)

    @triton.jit
    def _prev_block(buf, BLOCK: tl.constexpr):  # reads what the previous program writes
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        prev = tl.load(buf + offs - BLOCK, mask=(offs >= BLOCK), other=0.0)
        tl.store(buf + offs, prev + 1.0)

    @triton.jit
    def _store_then_load(buf, out, BLOCK: tl.constexpr):  # reads back its own store, flipped
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(buf + offs, offs.to(tl.float32))
        rev = tl.program_id(0) * BLOCK + BLOCK - 1 - tl.arange(0, BLOCK)
        tl.store(out + offs, tl.load(buf + rev))

    @triton.jit
    def _through_table(tab, dst, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        e = tl.program_id(0)
        p = tl.load(tab + e).to(tl.pointer_type(tl.float32))
        offs = tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + e * n + offs, tl.load(p + offs + SHIFT, mask=m), mask=m)


def _run(fn):
    with Sanitizer() as san:
        fn()
    return san


def test_clean_copy_passes() -> None:
    src, dst = torch.randn(40), torch.empty(40)
    san = _run(lambda: _copy[(3,)](src, dst, 40, SHIFT=0, BLOCK=16))
    san.assert_clean()
    (launch,) = san.launches
    assert launch.kernel == "_copy" and launch.programs == 3
    assert launch.read_bytes == launch.written_bytes == 40 * 4
    assert torch.equal(dst, src)


def test_reads_past_a_view_are_caught() -> None:
    base = torch.randn(48)
    src, dst = base[:40], torch.empty(40)  # base[40] is in the storage, not in the view
    san = _run(lambda: _copy[(3,)](src, dst, 40, SHIFT=1, BLOCK=16))
    (bad,) = san.violations()
    assert "4 bytes read outside every tensor argument" in bad and bad.startswith("_copy:")
    with pytest.raises(AssertionError, match="outside every tensor"):
        san.assert_clean()


def test_write_race_is_caught() -> None:
    dst = torch.zeros(4)
    bad = _run(lambda: _first_of_each[(2,)](dst, BLOCK=4)).violations()
    assert len(bad) == 1 and "4 bytes written by more than one program" in bad[0]


def test_cross_program_read_of_a_write_is_caught() -> None:
    buf = torch.zeros(32)
    bad = _run(lambda: _prev_block[(2,)](buf, BLOCK=16)).violations()
    assert len(bad) == 1 and "64 bytes read by one program and written by another" in bad[0]


def test_read_back_of_own_store_is_caught() -> None:
    buf, out = torch.zeros(32), torch.empty(32)
    bad = _run(lambda: _store_then_load[(2,)](buf, out, BLOCK=16)).violations()
    assert len(bad) == 1 and "128 bytes read back by the program that wrote them" in bad[0]


def test_pointer_table_targets_are_in_bounds() -> None:
    from blazec.kernels import _common

    ws = [torch.randn(8) for _ in range(3)]
    dst = torch.empty(3 * 7)
    # _common.pointer_table is looked up inside the sanitizer, as the launchers do
    with_table = _run(lambda: _through_table[(3,)](_common.pointer_table(ws)[0], dst, 7,
                                                   SHIFT=1, BLOCK=8))
    with_table.assert_clean()  # reads ws[e][1:8]: inside each table target
    assert torch.equal(dst, torch.cat([w[1:] for w in ws]))
    tab = torch.tensor([w.data_ptr() for w in ws])  # a table the sanitizer was not told about
    bad = _run(lambda: _through_table[(3,)](tab, dst, 7, SHIFT=1, BLOCK=8)).violations()
    assert len(bad) == 1 and f"{3 * 7 * 4} bytes read outside" in bad[0]


# ----------------------------------------------------------------------------------------------
# The blazec kernels
# ----------------------------------------------------------------------------------------------

ROUTE_CASES = [
    dict(T=37, k=3, E=7, kind="ragged", capacity=-1, priority="token"),
    dict(T=37, k=3, E=7, kind="empty_experts", capacity=3, priority="slot"),
    dict(T=50, k=2, E=5, kind="one_expert", capacity=4, priority="token"),
    dict(T=1, k=8, E=8, kind="uniform", capacity=-1, priority="token"),
]


@pytest.mark.parametrize("kw", ROUTE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_route_kernels_are_clean(kw: dict) -> None:
    from blazec.kernels.moe_route import moe_route
    from blazec.ops import reference as ref
    from tests.kernels.cases import make_ids

    ids = make_ids(kw["T"], kw["k"], kw["E"], kw["kind"], torch.Generator().manual_seed(kw["T"]))
    with Sanitizer() as san:
        got = moe_route(ids, kw["E"], kw["capacity"], kw["priority"])
    san.assert_clean()
    assert {launch.kernel for launch in san.launches} >= {"_route_count_kernel", "_route_scatter_kernel"}
    for g, w in zip(got, ref.moe_route(ids, kw["E"], kw["capacity"], kw["priority"])):
        assert torch.equal(g, w)


EXPERT_CASES = [
    dict(),
    dict(layout="list", bias="list", recompute=True),
    dict(layout="fused", activation="geglu", bias="stacked"),
    dict(layout="list_t", activation="relu", weight_pos="hidden", bias="list"),
    dict(layout="list_unaligned", bias="stacked"),
    dict(T=15, E=4, k=1, capacity=2, weight_pos="hidden"),  # k = 1: GEMMs write y and dx directly
    dict(T=15, E=4, k=3, capacity=2, priority="slot", bias="stacked", recompute=True),
    dict(T=12, E=6, k=3, ids_kind="empty_experts", activation="gelu"),
    dict(T=9, E=4, k=3, capacity=0),  # every pair dropped
    dict(T=40, d=37, I=35, E=5, k=3, ids_kind="uniform", bias="stacked"),  # many tiles
    dict(T=16, dtype=torch.bfloat16, tw_dtype=torch.float32, out_dtype=torch.float32, bias="stacked"),
    dict(noncontig=True, k=3),
]


@pytest.mark.parametrize("kw", [dict(capacity=3), dict(layout="list_t", activation="relu", weight_pos="hidden",
                                                     bias="list", T=15, E=4, capacity=4)],
                         ids=["dropped", "list_t,hidden,dropped"])
def test_fused_dh_and_split_gemm1_are_clean(monkeypatch, kw: dict) -> None:
    """BLAZEC_DH=fused: _dh_kernel where the split path would run (the cases above reach it
    only in "output" mode with a down bias); with BLAZEC_GEMM1=split, the gathered row GEMMs
    and _act_kernel (which zeroes the dropped pairs' preact rows) in place of _gemm1_kernel."""
    from blazec.kernels.moe_experts import moe_experts_bwd, moe_experts_fwd
    from tests.kernels.cases import make_case

    monkeypatch.setenv("BLAZEC_DH", "fused")
    monkeypatch.setenv("BLAZEC_GEMM1", "split")
    case = make_case(seed=8, **kw)
    with Sanitizer() as san:
        _, preact = moe_experts_fwd(*case.fwd_args())
        moe_experts_bwd(*case.bwd_args(preact))
    san.assert_clean()
    kernels = {launch.kernel for launch in san.launches}
    assert "_dh_kernel" in kernels and "_act_kernel" in kernels, kernels


def test_wide_gemm1_is_clean(monkeypatch) -> None:
    """BLAZEC_GEMM1=wide: the interleaved gate|up tile reads through two weight bases, masked
    by the output column; odd I, per-expert weights, dropped pairs."""
    from blazec.kernels.moe_experts import moe_experts_bwd, moe_experts_fwd
    from tests.kernels.cases import make_case, spy_launches

    monkeypatch.setenv("BLAZEC_GEMM1", "wide")
    launched = spy_launches(monkeypatch)
    case = make_case(seed=9, T=14, I=19, E=4, k=3, layout="list", capacity=5, activation="swiglu")
    with Sanitizer() as san:
        _, preact = moe_experts_fwd(*case.fwd_args())
        moe_experts_bwd(*case.bwd_args(preact))
    san.assert_clean()
    # the forward's GEMM 1 ran wide
    assert [n for n in launched if n.startswith("_gemm1_kernel")] == ["_gemm1_kernel+wide"], launched


def test_persistent_rows_gemm_is_clean(monkeypatch) -> None:
    """BLAZEC_ROWS=persistent (with the split GEMM 1, so that every single-product row GEMM
    runs persistent): programs loop over the experts' tiles only; dropped pairs, an empty
    expert."""
    from blazec.kernels.moe_experts import moe_experts_bwd, moe_experts_fwd
    from tests.kernels.cases import make_case, spy_launches

    monkeypatch.setenv("BLAZEC_ROWS", "persistent")
    monkeypatch.setenv("BLAZEC_GEMM1", "split")
    launched = spy_launches(monkeypatch)
    case = make_case(seed=10, T=14, E=5, k=3, capacity=4, ids_kind="empty_experts", bias="stacked")
    with Sanitizer() as san:
        _, preact = moe_experts_fwd(*case.fwd_args())
        moe_experts_bwd(*case.bwd_args(preact))
    san.assert_clean()
    assert sum(launch.kernel == "_rows_gemm_kernel" for launch in san.launches) >= 4
    # GEMM 1's two and the down GEMM ran persistent (the dh step is _dh_kernel here: "output"
    # mode with a down bias); the gated dX (two products) did not
    rows = [n for n in launched if n.startswith("_rows_gemm_kernel")]
    assert sum("+persistent" in n for n in rows) == 3 and all(("+persistent" in n) != ("+two" in n) for n in rows), rows


@pytest.mark.parametrize("kw", EXPERT_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_expert_kernels_are_clean(kw: dict) -> None:
    from blazec.kernels.moe_experts import moe_experts_bwd, moe_experts_fwd
    from tests.kernels.cases import make_case

    case = make_case(seed=7, **kw)
    with Sanitizer() as san:
        y, preact = moe_experts_fwd(*case.fwd_args())
        grads = moe_experts_bwd(*case.bwd_args(preact))
    san.assert_clean()
    kernels = {launch.kernel for launch in san.launches}
    assert {"_gemm1_kernel", "_rows_gemm_kernel", "_wgrad_kernel"} <= kernels, kernels
    # the dh step: split by default; "output" mode with a down bias keeps the fused kernel
    assert kernels & {"_dh_kernel", "_dh_epilogue_kernel"}, kernels
    assert sum(launch.written_bytes for launch in san.launches) > 0
    assert not torch.isnan(y).any() and all(not torch.isnan(g).any() for g in grads if isinstance(g, torch.Tensor))
