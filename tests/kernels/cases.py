"""Random MoE expert problems for the kernel tests, and the kernel-vs-reference comparison.

A case holds inputs on ``KERNEL_DEVICE`` in one of several weight layouts (3-D stacked, stacked
transposed views, row slices of a fused gate_up parameter, per-expert lists, per-expert
transposed views, a list with mixed strides) and routes them with the *reference* router, so
the expert kernels are checked apart from the routing kernel. ``check`` runs the Triton
launchers and the CPU reference (``blazec.ops.reference``) on the same inputs and compares
every output and every gradient, with per-dtype tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from blazec.ops import reference as ref
from blazec.ops.activations import is_gated
from tests.kernels.conftest import KERNEL_DEVICE

LAYOUTS = ["stacked", "stacked_t", "fused", "list", "list_t", "list_mixed", "list_unaligned"]
TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.float64: dict(rtol=1e-9, atol=1e-10),
}


@dataclass
class Case:
    x: torch.Tensor
    tw: torch.Tensor
    ids: torch.Tensor
    route: tuple
    w: dict
    activation: str
    weight_pos: str
    recompute: bool
    out_dtype: Optional[torch.dtype]
    gy: torch.Tensor

    def fwd_args(self):
        w = self.w
        return (self.x, self.tw, *self.route, w["w_gate"], w["w_up"], w["w_down"], w["b_gate"],
                w["b_up"], w["b_down"], self.activation, self.weight_pos, self.recompute, self.out_dtype)

    def bwd_args(self, preact):
        w = self.w
        return (self.gy, self.x, self.tw, *self.route, w["w_gate"], w["w_up"], w["w_down"],
                w["b_gate"], w["b_up"], w["b_down"], preact, self.activation, self.weight_pos,
                self.recompute)


def make_ids(T: int, k: int, E: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, E, (T, k), generator=gen)
    if kind == "ragged":  # Zipf-like: a few hot experts, a long tail
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        return torch.multinomial(p.expand(T * k, E), 1, generator=gen).view(T, k)
    if kind == "empty_experts":  # odd experts get nothing
        return 2 * torch.randint(0, (E + 1) // 2, (T, k), generator=gen)
    if kind == "one_expert":
        return torch.full((T, k), E // 2, dtype=torch.int64)
    raise AssertionError(kind)


def make_case(
    T: int = 9, d: int = 21, I: int = 19, E: int = 4, k: int = 2,
    activation: str = "swiglu", weight_pos: str = "output", recompute: bool = False,
    layout: str = "stacked", bias: str = "none", capacity: int = -1, priority: str = "token",
    dtype: torch.dtype = torch.float32, tw_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None, ids_kind: str = "ragged", seed: int = 0,
    noncontig: bool = False,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    dev = KERNEL_DEVICE

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(dev)

    gated = is_gated(activation)
    sg, sd = 1 / math.sqrt(d), 1 / math.sqrt(I)
    if noncontig:  # x and grad_y as column slices of wider buffers
        x = rnd(T, d + 3)[:, 1 : d + 1]
    else:
        x = rnd(T, d)
    tw = (torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1).to(tw_dtype or dtype).to(dev)
    ids = make_ids(T, k, E, ids_kind, gen)

    w: dict[str, list[torch.Tensor]] = {}
    if layout == "stacked":
        w["w_gate"] = [rnd(E, I, d, scale=sg)]
        w["w_up"] = [rnd(E, I, d, scale=sg)] if gated else []
        w["w_down"] = [rnd(E, d, I, scale=sd)]
    elif layout == "stacked_t":  # [E, in, out] parameters passed as transposed views
        w["w_gate"] = [rnd(E, d, I, scale=sg).transpose(1, 2)]
        w["w_up"] = [rnd(E, d, I, scale=sg).transpose(1, 2)] if gated else []
        w["w_down"] = [rnd(E, I, d, scale=sd).transpose(1, 2)]
    elif layout == "fused":  # one gate_up parameter, row-sliced; a padded slice for plain acts
        gu = rnd(E, 2 * I if gated else I + 3, d, scale=sg)
        w["w_gate"] = [gu[:, :I]] if gated else [gu[:, 2 : I + 2]]
        w["w_up"] = [gu[:, I:]] if gated else []
        w["w_down"] = [rnd(E, I, d, scale=sd).transpose(1, 2)]
    elif layout == "list":
        w["w_gate"] = [rnd(I, d, scale=sg) for _ in range(E)]
        w["w_up"] = [rnd(I, d, scale=sg) for _ in range(E)] if gated else []
        w["w_down"] = [rnd(d, I, scale=sd) for _ in range(E)]
    elif layout == "list_t":  # [in, out] tensors passed transposed (shared strides)
        w["w_gate"] = [rnd(d, I, scale=sg).t() for _ in range(E)]
        w["w_up"] = [rnd(d, I, scale=sg).t() for _ in range(E)] if gated else []
        w["w_down"] = [rnd(I, d, scale=sd).t() for _ in range(E)]
    elif layout == "list_mixed":  # strides differ between experts: the launcher falls back
        w["w_gate"] = [rnd(I, d, scale=sg) if e % 2 else rnd(d, I, scale=sg).t() for e in range(E)]
        w["w_up"] = [rnd(I, d, scale=sg) for _ in range(E)] if gated else []
        w["w_down"] = [rnd(d, I, scale=sd) for _ in range(E)]
    elif layout == "list_unaligned":  # views one element into their storage: a table with no 16-B alignment
        def off(rows, cols, scale):
            return rnd(rows * cols + 1, scale=scale)[1:].view(rows, cols)

        w["w_gate"] = [off(I, d, sg) for _ in range(E)]
        w["w_up"] = [off(I, d, sg) for _ in range(E)] if gated else []
        w["w_down"] = [off(d, I, sd) for _ in range(E)]
    else:
        raise AssertionError(layout)
    if bias == "stacked":
        w["b_gate"], w["b_down"] = [rnd(E, I)], [rnd(E, d)]
        w["b_up"] = [rnd(E, I)] if gated else []
    elif bias == "list":
        w["b_gate"] = [rnd(I) for _ in range(E)]
        w["b_up"] = [rnd(I) for _ in range(E)] if gated else []
        w["b_down"] = [rnd(d) for _ in range(E)]
    else:
        w["b_gate"], w["b_up"], w["b_down"] = [], [], []

    route = ref.moe_route(ids.to(dev), E, capacity, priority)
    gdt = out_dtype or dtype
    gy = (torch.randn(T, d + 2, generator=gen, dtype=torch.float64)[:, :d] if noncontig
          else torch.randn(T, d, generator=gen, dtype=torch.float64)).to(gdt).to(dev)
    return Case(x, tw, ids, route, w, activation, weight_pos, recompute, out_dtype, gy)


def _close(name: str, got, want, tol: Optional[dict]) -> None:
    """Same structure, shape, dtype, contiguity; values within ``tol`` (None: only NaN-free)."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{name}: {len(got)} vs {len(want)} tensors"
        for i, (g, r) in enumerate(zip(got, want)):
            _close(f"{name}[{i}]", g, r, tol)
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} vs {want.dtype}"
    assert got.is_contiguous(), f"{name}: not contiguous"
    if tol is None:
        assert not torch.isnan(got).any(), f"{name}: NaN (an element no kernel wrote?)"
        return
    torch.testing.assert_close(got.cpu(), want.cpu(), **tol, msg=lambda m: f"{name}: {m}")


NAMES = ["y", "preact", "dx", "d_topk_weights", "dw_gate", "dw_up", "dw_down", "db_gate", "db_up", "db_down"]


def _flat(outs) -> list:
    return [t for o in outs for t in (o if isinstance(o, list) else [o])]


def _run(case: Case, fwd, bwd) -> list:
    y, preact = fwd(*case.fwd_args())
    return [y, preact, *bwd(*case.bwd_args(preact))]


def _upcast(case: Case) -> Case:
    def up(t):
        return t.detach().to(torch.float64)

    w = {n: [up(t) for t in ts] for n, ts in case.w.items()}
    return Case(up(case.x), up(case.tw), case.ids, case.route, w, case.activation, case.weight_pos,
                case.recompute, None, up(case.gy))


def check(case: Case, tol: Optional[dict] = None) -> list:
    """Kernel forward and backward against the reference: y, preact and all eight gradients;
    and every input bitwise unchanged by the kernels. Returns the kernels' outputs (y, preact,
    then the gradients), for a test that compares them with another launch path's.

    fp32 (and fp64, which falls back) must match the reference within ``TOL``. For bf16/fp16
    the reference itself rounds at many points (a bf16 sum of a d(routing weight) can lose
    everything to cancellation), so each output is held to "as accurate as the reference":
    its max error against the fp64 reference of the same (upcast) inputs is at most twice the
    low-precision reference's, plus a small atol scaled by the output's magnitude.
    """
    from blazec.kernels.moe_experts import moe_experts_bwd, moe_experts_fwd

    inputs = _flat([case.x, case.tw, *case.route, *case.w.values(), case.gy])
    before = [t.clone() for t in inputs]
    got = _run(case, moe_experts_fwd, moe_experts_bwd)
    for i, (t, b) in enumerate(zip(inputs, before)):  # the kernels write only their outputs
        assert torch.equal(t, b), f"input {i} (of x, topk_weights, route, weights, grad_y) was modified"
    want = _run(case, ref.moe_experts_fwd, ref.moe_experts_bwd)
    assert len(got) == len(want) == len(NAMES)
    lowp = case.x.dtype in (torch.float16, torch.bfloat16)
    if not lowp:
        tol = tol or TOL[case.x.dtype]
        for n, g, r in zip(NAMES, got, want):
            _close(n, g, r, tol)
        return got
    for n, g, r in zip(NAMES, got, want):  # structure, dtypes, shapes; NaN-free
        _close(n, g, r, None)
    exact = _run(_upcast(case), ref.moe_experts_fwd, ref.moe_experts_bwd)
    rel = (tol or TOL[case.x.dtype])["atol"]
    for n, g, r, e in zip(NAMES, got, want, exact):
        for i, (gt, rt, et) in enumerate(zip(_flat([g]), _flat([r]), _flat([e]))):
            if et.numel() == 0:
                continue
            et = et.cpu().double()
            err = (gt.cpu().double() - et).abs().max().item()
            ref_err = (rt.cpu().double() - et).abs().max().item()
            scale = max(1.0, et.abs().max().item())
            assert err <= 2 * ref_err + rel * 0.25 * scale, (
                f"{n}[{i}]: kernel max error {err:.3g} vs reference's {ref_err:.3g} (scale {scale:.3g})")
    return got


# The launch flags spy_launches appends to a kernel's name.
_FLAGS = (("A_GATHER", "+gather"), ("GU_WIDE", "+wide"), ("TWO", "+two"), ("CAT", "+cat"), ("B_DESC", "+desc"),
          ("PERSISTENT", "+persistent"))


def spy_launches(monkeypatch, on_launch: Optional[Callable[[str, dict], None]] = None) -> list[str]:
    """The kernels the expert launchers launch from now on, by name, with a suffix for each of
    these flags that is set: "+gather" (A_GATHER), "+wide" (GU_WIDE), "+two" (TWO), "+cat" (CAT),
    "+desc" (B_DESC), "+persistent" (PERSISTENT). ``on_launch(kernel name, its arguments)`` also sees each launch."""
    from blazec.kernels import moe_experts

    launched: list[str] = []
    real_launch = moe_experts.launch

    def spy(kernel, tuned, grid, args, fixed):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        launched.append(name + "".join(suffix for flag, suffix in _FLAGS if args.get(flag)))
        if on_launch is not None:
            on_launch(name, args)
        return real_launch(kernel, tuned, grid, args, fixed)

    monkeypatch.setattr(moe_experts, "launch", spy)
    return launched
