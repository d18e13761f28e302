"""Tests of ``blazec::moe_experts`` (forward and backward) against a naive dense eager MoE.

The dense reference below is written the way naive model code is: a Python loop over experts,
``torch.where`` on a routing mask, ``index_add_`` into the output, activations spelled out from
their formulas, and autograd for the gradients. The op must match it for y and for the
gradients of x, topk_weights and every weight and bias, in every weight layout (per-expert
lists, stacked, transposed and sliced views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blazec.ops  # noqa: F401  (registers torch.ops.blazec.*)
from blazec.ops import ACTIVATIONS, moe_experts, moe_route, register_impl
from blazec.ops import reference as ref

GATED = {"swiglu", "geglu", "geglu_tanh"}
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
}

# ----------------------------------------------------------------------------------------------
# The naive dense reference
# ----------------------------------------------------------------------------------------------


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    # Written from the formulas (not F.*), so the op's ATen-based backward is checked
    # against autograd of independent math.
    if name == "silu":
        return g * torch.sigmoid(g)
    if name == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    if name == "relu":
        return g.clamp_min(0)
    raise AssertionError(name)


BASE = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def _pick(lst: list[torch.Tensor], e: int, stacked_dim: int) -> Optional[torch.Tensor]:
    if len(lst) == 0:
        return None
    return lst[0][e] if len(lst) == 1 and lst[0].dim() == stacked_dim else lst[e]


def keep_mask(ids: torch.Tensor, E: int, capacity: int, priority: str) -> torch.Tensor:
    """Which (t, j) pairs survive the capacity, by plain counting."""
    T, k = ids.shape
    keep = torch.zeros(T, k, dtype=torch.bool)
    seen = [0] * E
    order = [(t, j) for t in range(T) for j in range(k)]
    if priority == "slot":
        order = [(t, j) for j in range(k) for t in range(T)]
    for t, j in order:
        e = int(ids[t, j])
        if capacity < 0 or seen[e] < capacity:
            keep[t, j] = True
        seen[e] += 1
    return keep


def dense_moe(
    x: torch.Tensor,
    tw: torch.Tensor,
    ids: torch.Tensor,
    keep: torch.Tensor,
    E: int,
    w: dict[str, list[torch.Tensor]],
    activation: str,
    weight_pos: str,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    T, d = x.shape
    acc = torch.promote_types(torch.float32, torch.promote_types(x.dtype, tw.dtype))
    y = torch.zeros(T, d, dtype=acc)
    for e in range(E):
        tok, slot = torch.where((ids == e) & keep)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        g = xe @ _pick(w["w_gate"], e, 3).T
        bg = _pick(w["b_gate"], e, 2)
        if bg is not None:
            g = g + bg
        if activation in GATED:
            u = xe @ _pick(w["w_up"], e, 3).T
            bu = _pick(w["b_up"], e, 2)
            if bu is not None:
                u = u + bu
            h = _act(BASE[activation], g) * u
        else:
            h = _act(activation, g)
        we = tw[tok, slot].unsqueeze(1)
        wd, bd = _pick(w["w_down"], e, 3), _pick(w["b_down"], e, 2)
        if weight_pos == "output":
            o = h @ wd.T
            if bd is not None:
                o = o + bd
            c = o * we
        else:
            c = (h * we).to(x.dtype) @ wd.T
            if bd is not None:
                c = c + bd
        y = y.index_add(0, tok, c.to(acc))
    return y.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------
# Random cases in every weight layout
# ----------------------------------------------------------------------------------------------

LAYOUTS = ["list", "list_t", "stacked", "stacked_t", "fused"]
BIASES = ["none", "list", "stacked"]


@dataclass
class Case:
    T: int
    d: int
    I: int
    E: int
    k: int
    activation: str
    weight_pos: str
    recompute: bool
    capacity: int
    priority: str
    dtype: torch.dtype
    x: torch.Tensor
    tw: torch.Tensor
    ids: torch.Tensor
    params: dict[str, torch.Tensor]  # leaves that require grad
    views: Callable[[dict[str, torch.Tensor]], dict[str, list[torch.Tensor]]]
    route: tuple = field(default_factory=tuple)

    def leaves(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "topk_weights": self.tw, **self.params}

    def weights(self) -> dict[str, list[torch.Tensor]]:
        return self.views(self.params)


def make_case(
    T: int = 9,
    d: int = 5,
    I: int = 7,
    E: int = 4,
    k: int = 2,
    activation: str = "swiglu",
    weight_pos: str = "output",
    recompute: bool = False,
    layout: str = "stacked",
    bias: str = "none",
    capacity: int = -1,
    priority: str = "token",
    dtype: torch.dtype = torch.float64,
    ids_kind: str = "uniform",
    seed: int = 0,
    tw_dtype: Optional[torch.dtype] = None,
) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    gated = activation in GATED
    x = rnd(T, d).requires_grad_()
    tw = (torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1).to(tw_dtype or dtype)
    tw.requires_grad_()
    if ids_kind == "uniform":
        ids = torch.randint(0, E, (T, k), generator=gen)
    elif ids_kind == "empty_experts":
        ids = 2 * torch.randint(0, (E + 1) // 2, (T, k), generator=gen)
    elif ids_kind == "one_expert":
        ids = torch.full((T, k), E // 2, dtype=torch.int64)
    else:
        raise AssertionError(ids_kind)

    sg, sd = 1 / math.sqrt(d), 1 / math.sqrt(I)
    p: dict[str, torch.Tensor] = {}
    # Leaves are stored in the layout a model would hold; `views` derives the op arguments.
    if layout == "list":
        for e in range(E):
            p[f"wg{e}"] = rnd(I, d, scale=sg)
            if gated:
                p[f"wu{e}"] = rnd(I, d, scale=sg)
            p[f"wd{e}"] = rnd(d, I, scale=sd)
    elif layout == "list_t":  # weights kept as [in, out] and passed transposed
        for e in range(E):
            p[f"wg{e}"] = rnd(d, I, scale=sg)
            if gated:
                p[f"wu{e}"] = rnd(d, I, scale=sg)
            p[f"wd{e}"] = rnd(I, d, scale=sd)
    elif layout == "stacked":
        p["wg"] = rnd(E, I, d, scale=sg)
        if gated:
            p["wu"] = rnd(E, I, d, scale=sg)
        p["wd"] = rnd(E, d, I, scale=sd)
    elif layout == "stacked_t":  # 3-D [E, in, out] parameters passed as transposes
        p["wg"] = rnd(E, d, I, scale=sg)
        if gated:
            p["wu"] = rnd(E, d, I, scale=sg)
        p["wd"] = rnd(E, I, d, scale=sd)
    elif layout == "fused":  # one fused gate_up parameter, sliced; padded for plain acts
        p["wgu"] = rnd(E, 2 * I if gated else I + 3, d, scale=sg)
        p["wd"] = rnd(E, I, d, scale=sd)
    else:
        raise AssertionError(layout)
    if bias == "list":
        for e in range(E):
            p[f"bg{e}"] = rnd(I)
            if gated:
                p[f"bu{e}"] = rnd(I)
            p[f"bd{e}"] = rnd(d)
    elif bias == "stacked":
        p["bg"] = rnd(E, I)
        if gated:
            p["bu"] = rnd(E, I)
        p["bd"] = rnd(E, d)
    for t in p.values():
        t.requires_grad_()

    def views(p: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        w: dict[str, list[torch.Tensor]] = {}
        if layout == "list":
            w["w_gate"] = [p[f"wg{e}"] for e in range(E)]
            w["w_up"] = [p[f"wu{e}"] for e in range(E)] if gated else []
            w["w_down"] = [p[f"wd{e}"] for e in range(E)]
        elif layout == "list_t":
            w["w_gate"] = [p[f"wg{e}"].t() for e in range(E)]
            w["w_up"] = [p[f"wu{e}"].t() for e in range(E)] if gated else []
            w["w_down"] = [p[f"wd{e}"].t() for e in range(E)]
        elif layout == "stacked":
            w["w_gate"] = [p["wg"]]
            w["w_up"] = [p["wu"]] if gated else []
            w["w_down"] = [p["wd"]]
        elif layout == "stacked_t":
            w["w_gate"] = [p["wg"].transpose(1, 2)]
            w["w_up"] = [p["wu"].transpose(1, 2)] if gated else []
            w["w_down"] = [p["wd"].transpose(1, 2)]
        else:
            w["w_gate"] = [p["wgu"][:, :I]] if gated else [p["wgu"][:, 2 : I + 2]]
            w["w_up"] = [p["wgu"][:, I:]] if gated else []
            w["w_down"] = [p["wd"].transpose(1, 2)]
        if bias == "list":
            w["b_gate"] = [p[f"bg{e}"] for e in range(E)]
            w["b_up"] = [p[f"bu{e}"] for e in range(E)] if gated else []
            w["b_down"] = [p[f"bd{e}"] for e in range(E)]
        elif bias == "stacked":
            w["b_gate"], w["b_down"] = [p["bg"]], [p["bd"]]
            w["b_up"] = [p["bu"]] if gated else []
        else:
            w["b_gate"], w["b_up"], w["b_down"] = [], [], []
        return w

    case = Case(T, d, I, E, k, activation, weight_pos, recompute, capacity, priority, dtype,
                x, tw, ids, p, views)
    case.route = moe_route(ids, E, capacity, priority)
    return case


def run_op(case: Case, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    w = case.weights()
    sp, eo, pp = case.route
    return moe_experts(
        case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"], w["b_gate"],
        w["b_up"], w["b_down"], case.activation, case.weight_pos, case.recompute, out_dtype,
    )


def run_dense(case: Case, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    keep = keep_mask(case.ids, case.E, case.capacity, case.priority)
    return dense_moe(case.x, case.tw, case.ids, keep, case.E, case.weights(), case.activation,
                     case.weight_pos, out_dtype)


def grads(y: torch.Tensor, leaves: dict[str, torch.Tensor], gy: torch.Tensor) -> dict[str, torch.Tensor]:
    names = list(leaves)
    if not y.requires_grad:  # the dense reference with every pair dropped
        return {n: torch.zeros_like(leaves[n]) for n in names}
    gs = torch.autograd.grad(y, [leaves[n] for n in names], gy, allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, gs)}


def check_case(case: Case, tol: Optional[dict] = None) -> None:
    tol = tol or TOL[case.dtype]
    y = run_op(case)
    y_ref = run_dense(case)
    assert y.dtype == y_ref.dtype == case.x.dtype
    torch.testing.assert_close(y, y_ref, **tol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gy = gy.to(y.dtype)
    g = grads(y, case.leaves(), gy)
    g_ref = grads(y_ref, case.leaves(), gy)
    for name in g:
        assert g[name].shape == case.leaves()[name].shape, name
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=lambda m: f"grad of {name}: {m}")


# ----------------------------------------------------------------------------------------------
# Value and gradient tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("weight_pos", ["output", "hidden"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_fp64(activation: str, weight_pos: str, recompute: bool, bias: str) -> None:
    check_case(make_case(activation=activation, weight_pos=weight_pos, recompute=recompute,
                         bias=bias, capacity=4, priority="slot", T=11, E=5, k=2))


@pytest.mark.parametrize("bias", ["none", "list"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_weight_layouts(layout: str, activation: str, bias: str) -> None:
    check_case(make_case(layout=layout, activation=activation, bias=bias, T=10, E=3, k=2))


@pytest.mark.parametrize("weight_pos", ["output", "hidden"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_fp32(activation: str, weight_pos: str) -> None:
    check_case(make_case(activation=activation, weight_pos=weight_pos, dtype=torch.float32,
                         bias="stacked", layout="stacked_t", T=24, d=17, I=33, E=6, k=3,
                         capacity=10, seed=3))


@pytest.mark.parametrize(
    "kw",
    [
        dict(T=1, E=1, k=1),
        dict(T=1, E=8, k=8),
        dict(T=1, E=3, k=4, layout="list"),
        dict(T=13, E=16, k=8),
        dict(T=12, E=16, k=1, layout="list", bias="list"),
        dict(T=10, E=6, k=3, ids_kind="empty_experts", layout="list", bias="list"),
        dict(T=10, E=6, k=3, ids_kind="empty_experts", layout="fused", bias="stacked"),
        dict(T=9, E=5, k=2, ids_kind="one_expert"),
        dict(T=9, E=5, k=2, ids_kind="one_expert", capacity=3, priority="slot"),
        dict(T=9, E=4, k=3, capacity=0),  # every pair dropped: y and all grads are zero
        dict(T=15, E=4, k=3, capacity=1, priority="slot", bias="stacked"),
        dict(T=15, E=4, k=3, capacity=2, priority="token", weight_pos="hidden"),
        dict(T=7, d=1, I=1, E=2, k=2),
        dict(T=7, d=3, I=1, E=2, k=2, activation="gelu_tanh", bias="list"),
        dict(T=5, d=9, I=11, E=3, k=2, activation="geglu", recompute=True),
    ],
)
def test_edge_cases(kw: dict) -> None:
    check_case(make_case(**kw))


def test_capacity_zero_gives_zeros() -> None:
    case = make_case(T=6, E=3, k=2, capacity=0, bias="stacked")
    y = run_op(case)
    assert torch.equal(y, torch.zeros_like(y))


def test_mixed_dtypes_bf16_x_fp32_router() -> None:
    # bf16 activations and weights with an fp32 router: GEMMs in bf16, the routing-weight
    # multiply in fp32, as eager code would do it.
    for weight_pos in ("output", "hidden"):
        case = make_case(dtype=torch.bfloat16, tw_dtype=torch.float32, weight_pos=weight_pos,
                         T=16, d=8, I=12, E=4, k=2, bias="stacked", layout="stacked_t", seed=5)
        for out_dtype in (None, torch.float32):
            y = run_op(case, out_dtype)
            y_ref = run_dense(case, out_dtype)
            assert y.dtype == (out_dtype or torch.bfloat16)
            torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        g, g_ref = grads(y, case.leaves(), gy), grads(y_ref, case.leaves(), gy)
        assert g["topk_weights"].dtype == torch.float32 and g["x"].dtype == torch.bfloat16
        for name in g:
            torch.testing.assert_close(g[name], g_ref[name], rtol=3e-2, atol=3e-2,
                                       msg=lambda m: f"grad of {name}: {m}")


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 12),
    d=st.integers(1, 9),
    I=st.integers(1, 9),
    E=st.integers(1, 16),
    k=st.integers(1, 8),
    activation=st.sampled_from(ACTIVATIONS),
    weight_pos=st.sampled_from(["output", "hidden"]),
    recompute=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    bias=st.sampled_from(BIASES),
    capacity=st.sampled_from([-1, 0, 1, 2, 5, 100]),
    priority=st.sampled_from(["token", "slot"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fp64(**kw) -> None:
    check_case(make_case(**kw))


# ----------------------------------------------------------------------------------------------
# preact, saved tensors, torch.library checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_preact_contents(activation: str) -> None:
    case = make_case(activation=activation, bias="stacked", capacity=2, priority="slot",
                     T=8, E=3, k=2)
    w = case.weights()
    sp, eo, pp = case.route
    y, preact = torch.ops.blazec.moe_experts(
        case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"], w["b_gate"],
        w["b_up"], w["b_down"], activation)
    n_in = 2 * case.I if activation in GATED else case.I
    assert preact.shape == (case.T * case.k, n_in)
    assert not preact.requires_grad
    n = int(eo[-1])
    assert torch.equal(preact[n:], torch.zeros_like(preact[n:]))
    for e in range(case.E):
        rows = sp[int(eo[e]) : int(eo[e + 1])]
        xe = case.x[rows // case.k]
        g = xe @ w["w_gate"][0][e].T + w["b_gate"][0][e]
        torch.testing.assert_close(preact[int(eo[e]) : int(eo[e + 1]), : case.I], g)
        if activation in GATED:
            u = xe @ w["w_up"][0][e].T + w["b_up"][0][e]
            torch.testing.assert_close(preact[int(eo[e]) : int(eo[e + 1]), case.I :], u)
    _, empty = torch.ops.blazec.moe_experts(
        case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"], w["b_gate"],
        w["b_up"], w["b_down"], activation, "output", True)
    assert empty.shape == (0,) and empty.dtype == case.x.dtype


@pytest.mark.parametrize("layout", ["list", "stacked_t"])
@pytest.mark.parametrize("recompute", [False, True])
def test_saved_tensors(recompute: bool, layout: str) -> None:
    case = make_case(T=16, d=6, I=10, E=4, k=4, recompute=recompute, layout=layout,
                     bias="list", capacity=12)
    T, k, d, I = case.T, case.k, case.d, case.I
    w = case.weights()  # views built outside the hooks: only the op's saves are recorded
    sp, eo, pp = case.route
    inputs = [case.x, case.tw, sp, eo, pp] + [t for lst in w.values() for t in lst]
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = moe_experts(case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"],
                        w["b_gate"], w["b_up"], w["b_down"], case.activation,
                        case.weight_pos, recompute)

    def is_input(t: torch.Tensor) -> bool:
        return any(t.data_ptr() == i.data_ptr() and t.shape == i.shape
                   and t.stride() == i.stride() for i in inputs)

    threshold = T * k * min(d, I)
    big = [t for t in saved if t.numel() >= threshold and not is_input(t)]
    if recompute:
        assert big == [], [tuple(t.shape) for t in big]
    else:
        assert [tuple(t.shape) for t in big] == [(T * k, 2 * I)]
    # Everything not an input is preact (the only extra output autograd keeps).
    extra = [tuple(t.shape) for t in saved if not is_input(t)]
    assert extra == ([(0,)] if recompute else [(T * k, 2 * I)])
    y.sum().backward()  # and the backward runs from exactly that


def _op_args(case: Case) -> tuple:
    w = case.weights()
    sp, eo, pp = case.route
    return (case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"], w["b_gate"],
            w["b_up"], w["b_down"], case.activation, case.weight_pos, case.recompute)


@pytest.mark.parametrize(
    "kw",
    [
        dict(layout="list", bias="list", activation="swiglu", capacity=3, priority="slot"),
        dict(layout="stacked_t", bias="stacked", activation="gelu", weight_pos="hidden",
             recompute=True),
    ],
)
def test_opcheck_experts(kw: dict) -> None:
    case = make_case(T=6, d=3, I=5, E=3, k=2, **kw)
    torch.library.opcheck(torch.ops.blazec.moe_experts.default, _op_args(case))


def test_opcheck_experts_backward() -> None:
    for recompute in (False, True):
        case = make_case(T=6, d=3, I=5, E=3, k=2, layout="list", bias="stacked",
                         recompute=recompute, capacity=3)
        args = _op_args(case)
        with torch.no_grad():
            _, preact = torch.ops.blazec.moe_experts(*args)
        gy = torch.randn(case.T, case.d, dtype=case.dtype)
        detached = tuple(
            [t.detach() for t in a] if isinstance(a, list)
            else (a.detach() if isinstance(a, torch.Tensor) else a)
            for a in args
        )
        bwd_args = (gy, *detached[:11], preact, case.activation, case.weight_pos, recompute)
        torch.library.opcheck(torch.ops.blazec.moe_experts_backward.default, bwd_args)


def test_gradcheck_fp64() -> None:
    case = make_case(T=4, d=3, I=2, E=3, k=2, layout="list_t", bias="stacked",
                     activation="geglu_tanh", capacity=2, priority="slot")
    names = list(case.leaves())

    def f(*leaves: torch.Tensor) -> torch.Tensor:
        saved = dict(case.params)
        case.x, case.tw = leaves[0], leaves[1]
        case.params = dict(zip(names[2:], leaves[2:]))
        try:
            return run_op(case)
        finally:
            case.params = saved

    assert torch.autograd.gradcheck(f, tuple(case.leaves().values()))


def test_double_backward_is_a_clear_error() -> None:
    case = make_case(T=4, E=2, k=2)
    y = run_op(case)
    (gx,) = torch.autograd.grad(y.sum(), case.x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_registered_impl_is_used() -> None:
    calls: list[str] = []

    def spy_fwd(*args):
        calls.append("fwd")
        return ref.moe_experts_fwd(*args)

    def spy_bwd(*args):
        calls.append("bwd")
        return ref.moe_experts_bwd(*args)

    register_impl("moe_experts", "cpu", spy_fwd)
    register_impl("moe_experts_backward", "cpu", spy_bwd)
    try:
        case = make_case(T=4, E=2, k=2)
        run_op(case).sum().backward()
    finally:
        register_impl("moe_experts", "cpu", None)
        register_impl("moe_experts_backward", "cpu", None)
    assert calls == ["fwd", "bwd"]
    with pytest.raises(ValueError, match="unknown blaze op"):
        register_impl("moe_expert", "cuda", spy_fwd)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

E_C, K_C, D_C, I_C = 4, 2, 6, 10


def _moe_layer(x, router, w_gate_list, w_up, w_down_t, b_down):
    # The rewritten form of a top-k MoE layer: plain gating, then the two blaze ops.
    probs = torch.softmax(x @ router.T, dim=-1)
    tw, ids = torch.topk(probs, K_C, dim=-1)
    tw = tw / tw.sum(dim=-1, keepdim=True)
    sp, eo, pp = moe_route(ids, E_C, 5, "slot")
    return moe_experts(x, tw, sp, eo, pp, w_gate_list, [w_up], [w_down_t.transpose(1, 2)],
                       None, None, [b_down], "swiglu")


def _compile_inputs(T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D_C, generator=gen, requires_grad=True)
    router = torch.randn(E_C, D_C, generator=gen, requires_grad=True)
    wg = [(torch.randn(I_C, D_C, generator=gen) * 0.4).requires_grad_() for _ in range(E_C)]
    wu = (torch.randn(E_C, I_C, D_C, generator=gen) * 0.4).requires_grad_()
    wd = (torch.randn(E_C, I_C, D_C, generator=gen) * 0.3).requires_grad_()
    bd = torch.randn(E_C, D_C, generator=gen, requires_grad=True)
    return x, router, wg, wu, wd, bd


def _run_and_grads(fn, inputs):
    x, router, wg, wu, wd, bd = inputs
    y = fn(x, router, wg, wu, wd, bd)
    leaves = [x, router, *wg, wu, wd, bd]
    return y, torch.autograd.grad(y, leaves, torch.ones_like(y) * 0.5)


def test_compile_aot_eager_matches_eager() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_moe_layer, backend=counter, fullgraph=True)
    inputs = _compile_inputs(13, 0)
    y_e, g_e = _run_and_grads(_moe_layer, inputs)
    y_c, g_c = _run_and_grads(compiled, inputs)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Both blaze ops are in the captured graph (as opaque calls, not traced through).
    targets = " ".join(str(n.target) for gm in counter.graphs for n in gm.graph.nodes)
    assert "blazec.moe_route" in targets and "blazec.moe_experts" in targets


def test_compile_dynamic_shapes() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_moe_layer, backend=counter, fullgraph=True, dynamic=True)
    for T in (7, 64, 1):
        inputs = _compile_inputs(T, T)
        y_e, g_e = _run_and_grads(_moe_layer, inputs)
        y_c, g_c = _run_and_grads(compiled, inputs)
        assert y_c.shape == (T, D_C)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # One symbolic graph serves T=7 and T=64 (T=1 may be specialized).
    assert counter.frame_count <= 2


# ----------------------------------------------------------------------------------------------
# Validation errors
# ----------------------------------------------------------------------------------------------


def _valid(**case_kw):
    case = make_case(T=5, d=4, I=6, E=3, k=2, **case_kw)
    w = {n: [t.detach() for t in lst] for n, lst in case.weights().items()}
    sp, eo, pp = case.route
    return dict(x=case.x.detach(), topk_weights=case.tw.detach(), sorted_pairs=sp,
                expert_offsets=eo, pair_pos=pp, **w, activation=case.activation)


def _call(a: dict) -> torch.Tensor:
    return torch.ops.blazec.moe_experts(
        a["x"], a["topk_weights"], a["sorted_pairs"], a["expert_offsets"], a["pair_pos"],
        a["w_gate"], a["w_up"], a["w_down"], a["b_gate"], a["b_up"], a["b_down"],
        a["activation"], a.get("weight_pos", "output"), False, a.get("out_dtype"))


def _set(**changes):
    def apply(a: dict) -> None:
        a.update({k: (v(a) if callable(v) else v) for k, v in changes.items()})
    return apply


ERROR_CASES = {
    "unknown activation": (dict(), _set(activation="swish"), "unknown activation 'swish'"),
    "bad weight_pos": (dict(), _set(weight_pos="input"), "weight_pos must be one of"),
    "w_up for plain act": (dict(activation="gelu"),
                           _set(w_up=lambda a: [t.clone() for t in a["w_gate"]]),
                           "'gelu' is not gated; w_up must be empty"),
    "b_up for plain act": (dict(activation="relu", bias="stacked"),
                           _set(b_up=lambda a: a["b_gate"]), "b_up must be empty"),
    "missing w_up": (dict(activation="swiglu"), _set(w_up=[]), "'swiglu' is gated and needs w_up"),
    "list too short": (dict(layout="list"), _set(w_down=lambda a: a["w_down"][:2]),
                       r"w_down must hold E=3 2-D .* got 2 tensor"),
    "3-D in a long list": (dict(layout="stacked"),
                           _set(w_gate=lambda a: [a["w_gate"][0], a["w_gate"][0]]),
                           r"w_gate must hold E=3"),
    "wrong stacked shape": (dict(layout="stacked"),
                            _set(w_down=lambda a: [a["w_down"][0].transpose(1, 2)]),
                            r"w_down\[0\] \(stacked\) must have shape \[E, out, in\] = \[3, 4, 6\], got \[3, 6, 4\]"),
    "wrong per-expert shape": (dict(layout="list"),
                               _set(w_up=lambda a: a["w_up"][:2] + [torch.randn(6, 5, dtype=torch.float64)]),
                               r"w_up\[2\] must have shape \[out, in\] = \[6, 4\], got \[6, 5\]"),
    "wrong bias shape": (dict(bias="list"),
                         _set(b_down=lambda a: [torch.randn(6, dtype=torch.float64)] * 3),
                         r"b_down\[0\] must have shape \[out\] = \[4\], got \[6\]"),
    "mixed dtypes": (dict(layout="list"),
                     _set(w_gate=lambda a: [t.float() for t in a["w_gate"]]),
                     r"w_gate\[0\] has dtype torch.float32 but x has torch.float64"),
    "one expert's dtype": (dict(layout="list"),
                           _set(w_down=lambda a: a["w_down"][:2] + [a["w_down"][2].float()]),
                           r"w_down\[2\] has dtype torch.float32 but x has torch.float64"),
    "one expert's device": (dict(layout="list"),
                            _set(w_up=lambda a: [a["w_up"][0].to("meta")] + a["w_up"][1:]),
                            r"w_up\[0\] is on meta but x is on cpu"),
    "one expert bias's dtype": (dict(bias="list"),
                                _set(b_up=lambda a: a["b_up"][:1] + [a["b_up"][1].half()] + a["b_up"][2:]),
                                r"b_up\[1\] has dtype torch.float16"),
    "bias dtype": (dict(bias="stacked"), _set(b_gate=lambda a: [a["b_gate"][0].float()]),
                   r"b_gate\[0\] has dtype torch.float32"),
    "integer x": (dict(), _set(x=lambda a: a["x"].long()), "x has unsupported dtype torch.int64"),
    "integer topk_weights": (dict(), _set(topk_weights=lambda a: a["topk_weights"].long()),
                             "topk_weights has unsupported dtype"),
    "bad out_dtype": (dict(), _set(out_dtype=torch.int32), "unsupported out_dtype"),
    "x not 2-D": (dict(), _set(x=lambda a: a["x"][None]), r"x must be 2-D \[T, d\]"),
    "topk_weights T": (dict(), _set(topk_weights=lambda a: a["topk_weights"][:4]),
                       r"topk_weights must have shape \[T, k\] with T=5 \(from x\), got \[4, 2\]"),
    "k = 0": (dict(), _set(topk_weights=lambda a: a["topk_weights"][:, :0],
                           sorted_pairs=lambda a: a["sorted_pairs"][:0], pair_pos=lambda a: a["pair_pos"][:0]),
              r"topk_weights has shape \[T, 0\]: every token needs k >= 1"),  # was an IndexError
    "sorted_pairs length": (dict(), _set(sorted_pairs=lambda a: a["sorted_pairs"][:9]),
                            r"sorted_pairs must have shape \[T\*k\] = \[10\] \(T=5, k=2\), got \[9\]"),
    "pair_pos length": (dict(), _set(pair_pos=lambda a: a["pair_pos"][:3]), "pair_pos must have shape"),
    "index dtype": (dict(), _set(pair_pos=lambda a: a["pair_pos"].int()), "pair_pos must be int64"),
    "offsets too short": (dict(), _set(expert_offsets=lambda a: a["expert_offsets"][:1]),
                          r"expert_offsets must be 1-D \[E\+1\] with E >= 1"),
    "weights vs E": (dict(layout="stacked"), _set(expert_offsets=lambda a: torch.tensor([0, 4, 10])),
                     r"w_gate\[0\] \(stacked\) must have shape \[E, out, in\] = \[2, 6, 4\]"),
    "empty w_gate": (dict(), _set(w_gate=[]), "w_gate is empty"),
    "1-D w_gate": (dict(layout="stacked"), _set(w_gate=lambda a: [a["w_gate"][0].flatten()]),  # was an IndexError
                   r"w_gate must hold E 2-D \[I, d\] tensors or one 3-D \[E, I, d\] tensor; w_gate\[0\] has shape \[72\]"),
    # the route's contents (the reference checks them; each gave a wrong y or an IndexError)
    "offsets decrease": (dict(), _set(expert_offsets=torch.tensor([0, 7, 3, 10])),
                         r"expert_offsets must start at 0, not decrease and end at <= T\*k = 10 .*got \[0, 7, 3, 10\]"),
    "offsets start below 0": (dict(), _set(expert_offsets=torch.tensor([-2, 3, 6, 10])), "must start at 0"),
    "offsets past T*k": (dict(), _set(expert_offsets=torch.tensor([0, 3, 6, 12])), r"end at <= T\*k = 10"),
    "pair out of range": (dict(), _set(sorted_pairs=lambda a: a["sorted_pairs"].clone().fill_(10)),
                          r"sorted_pairs holds a pair outside \[0, T\*k = 10\)"),
    "pair_pos not the route's": (dict(), _set(pair_pos=lambda a: a["pair_pos"].flip(0)),
                                 "pair_pos does not match sorted_pairs and expert_offsets"),
    "offsets not the route's": (dict(), _set(expert_offsets=torch.tensor([0, 0, 0, 9])),
                                "pair_pos does not match sorted_pairs and expert_offsets"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_experts_errors(name: str) -> None:
    case_kw, change, match = ERROR_CASES[name]
    a = _valid(**case_kw)
    _call(a)  # the unmodified arguments are valid
    change(a)
    with pytest.raises(ValueError, match=match):
        _call(a)


@pytest.mark.parametrize("change, match", [
    (dict(grad_y=lambda g, p: g.to("meta")), "grad_y is on meta but x is on cpu"),
    (dict(preact=lambda g, p: p.to("meta")), "preact is on meta but x is on cpu"),
    (dict(grad_y=lambda g, p: g.long()), "grad_y must be a floating-point tensor, got torch.int64"),
    (dict(grad_y=lambda g, p: g.bool()), "grad_y must be a floating-point tensor, got torch.bool"),
])
def test_backward_errors(change, match) -> None:
    """grad_y and preact on another device, or an integer grad_y, ran: dx of 9e15 from
    uninitialized meta memory, a different dx for an int64 grad_y."""
    a = _valid()
    y, preact = _call(a)

    def backward(grad_y, preact):
        return torch.ops.blazec.moe_experts_backward(
            grad_y, a["x"], a["topk_weights"], a["sorted_pairs"], a["expert_offsets"], a["pair_pos"],
            a["w_gate"], a["w_up"], a["w_down"], a["b_gate"], a["b_up"], a["b_down"], preact,
            a["activation"], "output", False)

    grad_y = torch.randn_like(y)
    backward(grad_y, preact)  # valid as they are
    args = {"grad_y": grad_y, "preact": preact}
    args.update({k: f(grad_y, preact) for k, f in change.items()})
    with pytest.raises(ValueError, match=match):
        backward(**args)


def _count_route_checks(monkeypatch) -> list:
    """Calls of the ops' host check of a route moe_route did not mark (blazec.ops.experts)."""
    import blazec.ops.experts as experts

    calls = []
    real = experts.check_route_contents

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(experts, "check_route_contents", counting)
    return calls


def test_a_hand_built_route_is_checked_once_and_moe_routes_never(monkeypatch) -> None:
    """The kernels trust a route's contents, so the ops check a route that moe_route did not
    mark (a hand-built one gave NaN, a wrong y or a crash on the kernel path), once: the check
    marks it. moe_route's own routes, and ones written in place since, are told apart."""
    calls = _count_route_checks(monkeypatch)
    a = _valid()
    y, preact = _call(a)
    y.sum()
    assert calls == []  # _valid's route comes from moe_route
    a["sorted_pairs"], a["expert_offsets"], a["pair_pos"] = (t.clone() for t in (
        a["sorted_pairs"], a["expert_offsets"], a["pair_pos"]))
    _call(a)
    _call(a)
    assert len(calls) == 1
    a["pair_pos"].add_(0)  # a write bumps the version: checked again
    _call(a)
    assert len(calls) == 2
    sp, eo, pp = moe_route(torch.randint(0, 3, (5, 2)), 3)
    a.update(sorted_pairs=sp, expert_offsets=eo, pair_pos=pp)
    torch.ops.blazec.moe_experts_backward(
        torch.ones_like(y), a["x"], a["topk_weights"], sp, eo, pp, a["w_gate"], a["w_up"], a["w_down"],
        a["b_gate"], a["b_up"], a["b_down"], _call(a)[1], a["activation"], "output", False)
    assert len(calls) == 2
    a["expert_offsets"] = eo.clone()  # one of the three from another route: not one route
    _call(a)
    assert len(calls) == 3


def test_routes_save_and_load_with_their_mark(monkeypatch) -> None:
    """The mark is a tuple of ints: torch.load(weights_only=True) refused the class it was."""
    import io

    a = _valid()
    buf = io.BytesIO()
    torch.save((a["sorted_pairs"], a["expert_offsets"], a["pair_pos"]), buf)
    buf.seek(0)
    a["sorted_pairs"], a["expert_offsets"], a["pair_pos"] = torch.load(buf)
    _call(a)


@pytest.mark.parametrize("write", [False, True])
def test_the_backward_checks_a_route_a_saved_tensor_hook_hands_back(monkeypatch, write) -> None:
    """A saved-tensor hook that copies (activation offloading) hands the backward new route
    tensors: unmarked, so checked (on a GPU on the device, without a sync). A pass-through hook
    also turns off autograd's version check, so a route written after the forward reaches the
    backward op: the check catches it (a first version re-marked the hook's tensors unchecked)."""
    calls = _count_route_checks(monkeypatch)
    a = _valid()
    x = a["x"].clone().requires_grad_()
    sp, eo, pp = (t.clone() for t in (a["sorted_pairs"], a["expert_offsets"], a["pair_pos"]))
    hooks = (lambda t: t, lambda t: t) if write else (lambda t: t.clone(), lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        y = moe_experts(x, a["topk_weights"], sp, eo, pp, a["w_gate"], a["w_up"], a["w_down"], a["b_gate"],
                        a["b_up"], a["b_down"], a["activation"])
    assert len(calls) == 1  # the forward checks the cloned route once, and marks it
    if write:
        pp[0] = 10**6
        with pytest.raises(ValueError, match="pair_pos does not match"):
            y.sum().backward()
    else:
        y.sum().backward()
        assert x.grad is not None
    assert len(calls) == 2


def test_a_loaded_route_written_after_loading_is_checked(monkeypatch) -> None:
    """A route saved and loaded in the same process: its versions restart, so a write after the
    load could bring them back to the marked ones; the mark also pins the memory."""
    import io

    calls = _count_route_checks(monkeypatch)
    sp, eo, pp = moe_route(torch.randint(0, 3, (5, 2)), 3)
    buf = io.BytesIO()
    torch.save((sp, eo, pp), buf)
    buf.seek(0)
    sp2, eo2, pp2 = torch.load(buf)
    from blazec.ops.route import is_marked_route

    for old, new in ((sp, sp2), (eo, eo2), (pp, pp2)):
        while new._version < old._version:  # writes that bring the versions back to the marked ones
            new.add_(0)
    assert is_marked_route(sp, eo, pp) and not is_marked_route(sp2, eo2, pp2)
    assert calls == []


@pytest.mark.parametrize("name", ["offsets decrease", "offsets past T*k", "pair out of range",
                                  "pair_pos not the route's", "offsets not the route's"])
def test_the_device_side_route_check_refuses_what_the_host_check_refuses(name) -> None:
    """``assert_route_async`` (the backward's check on a GPU, and any check under CUDA graph
    capture) against the route cases of ERROR_CASES; on the CPU its assert raises at once."""
    a = _valid()
    ref.assert_route_async(a["sorted_pairs"], a["expert_offsets"], a["pair_pos"])  # a route: passes
    ERROR_CASES[name][1](a)
    with pytest.raises(RuntimeError, match="the route is not one moe_route built"):
        ref.assert_route_async(a["sorted_pairs"], a["expert_offsets"], a["pair_pos"])


@pytest.mark.parametrize("final_stage", ["inductor", "eager"])
@pytest.mark.parametrize("example", ["demo", "moe_gshard_top2.py"])
def test_compiled_routes_are_not_checked_on_the_host(monkeypatch, final_stage, example) -> None:
    """The routes a compiled graph passes from moe_route (or GShard's second route, without
    the pairs of weight 0: moe_route_sink) to moe_experts and on to the backward (saved for
    it) keep their mark: no host check, which would sync on a GPU."""
    from blazec import report
    from blazec.demo_model import make_default
    from tests.helpers import load_example

    calls = _count_route_checks(monkeypatch)
    if example == "demo":
        model, (x,) = make_default(tokens=16, d=16, inter=24, num_experts=4)
    else:
        model, (x,) = load_example(example).make()
    with report.capture() as recs:
        out = torch.compile(model, backend="blaze", options={"final_stage": final_stage})(x)
    out.float().sum().backward()
    assert len([m for r in recs for p in r.pass_reports for m in p.matches]) == 1
    assert calls == []


def _vmap_case(requires_grad=False):
    case = make_case(T=7, d=5, I=6, E=3, k=2, ids_kind="empty_experts", seed=11)
    w = {n: [t.detach().clone().requires_grad_(requires_grad) for t in lst] for n, lst in case.weights().items()}
    x, tw = case.x.detach().clone().requires_grad_(requires_grad), case.tw.detach().clone().requires_grad_(requires_grad)

    def run(x_, tw_=None):
        return moe_experts(x_, tw if tw_ is None else tw_, *case.route, w["w_gate"], w["w_up"], w["w_down"],
                           w["b_gate"], w["b_up"], w["b_down"], case.activation, case.weight_pos)
    return case, x, tw, w, run


def test_vmap_runs_the_ops_once_per_batch_element() -> None:
    """torch.func.vmap over the ops (there was no rule: "Batching rule not implemented")."""
    case, x, tw, w, run = _vmap_case()
    xs, tws = torch.randn(3, *x.shape, dtype=x.dtype), torch.rand(3, *tw.shape, dtype=tw.dtype)
    got = torch.vmap(run)(xs, tws)
    for b in range(3):
        torch.testing.assert_close(got[b], run(xs[b], tws[b]), rtol=0, atol=0)
    ids = torch.randint(0, 3, (2, 7, 2))
    routes = torch.vmap(lambda i: moe_route(i, 3, 2))(ids)
    for b in range(2):
        for g, want in zip(routes, moe_route(ids[b], 3, 2)):
            assert torch.equal(g[b], want)


@pytest.mark.parametrize("retain", [True, False])
def test_vmap_over_autograd_grad_gives_each_elements_gradients(retain) -> None:
    """The backward op under torch.func.vmap (batched grad_y), one call per element, and with
    preact read by every call: none may write over it."""
    case, x, tw, w, run = _vmap_case(requires_grad=True)
    leaves = [x, tw, *w["w_gate"], *w["w_down"]]
    gys = torch.randn(3, *x.shape, dtype=x.dtype)
    want = [torch.autograd.grad(run(x), leaves, gys[b]) for b in range(3)]
    y = run(x)
    got = torch.func.vmap(lambda g: torch.autograd.grad(y, leaves, g, retain_graph=retain))(gys)
    for b in range(3):
        for g, ref_g in zip(got, want[b]):
            torch.testing.assert_close(g[b], ref_g)


def test_batched_grads_through_autograd_grad_are_a_clear_error() -> None:
    """is_grads_batched=True batches with torch's legacy vmap, which cannot run the op; torch
    raised "Batching rule not implemented ... could not generate a fallback". Through a
    compiled model too (final stage eager: the backward graph calls the op)."""
    case, x, tw, w, run = _vmap_case(requires_grad=True)
    y = run(x)
    match = r"is_grads_batched=True\) is not supported.*one grad_outputs at a time"
    with pytest.raises(NotImplementedError, match=match):
        torch.autograd.grad(y, [x], torch.randn(2, *y.shape, dtype=y.dtype), is_grads_batched=True)
    from blazec.demo_model import make_default

    model, (x,) = make_default(tokens=16, d=16, inter=24, num_experts=4)
    x.requires_grad_()
    y = torch.compile(model, backend="blaze", options={"final_stage": "eager"})(x)
    with pytest.raises(NotImplementedError, match=match):
        torch.autograd.grad(y, [x], torch.randn(2, *y.shape), is_grads_batched=True)


def test_errors_also_raised_under_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = _valid(activation="gelu")
    a["w_up"] = [t.clone() for t in a["w_gate"]]
    mode = FakeTensorMode()
    fake = {k: ([mode.from_tensor(t) for t in v] if isinstance(v, list)
                else mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
            for k, v in a.items()}
    with mode, pytest.raises(ValueError, match="w_up must be empty"):
        _call(fake)


def test_list_gradients_are_views_of_one_stacked_buffer() -> None:
    """The backward op returns one stacked gradient per list; the autograd formula hands each
    per-expert parameter a view of it, and AccumulateGrad keeps the view (no copy)."""
    case = make_case(T=12, E=4, k=2, layout="list", bias="list", ids_kind="empty_experts", seed=4)
    w = {n: [t.detach().clone().requires_grad_() for t in ts] for n, ts in case.weights().items()}
    sp, eo, pp = case.route
    y = moe_experts(case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"],
                    w["b_gate"], w["b_up"], w["b_down"], case.activation, case.weight_pos)
    y.backward(torch.randn_like(y))
    for name, ts in w.items():
        assert len(ts) == case.E
        base = ts[0].grad.untyped_storage().data_ptr()
        for e, t in enumerate(ts):
            assert t.grad is not None and t.grad.shape == t.shape and t.grad.is_contiguous()
            assert t.grad.untyped_storage().data_ptr() == base, (name, e)
            assert t.grad.data_ptr() == base + e * t.numel() * t.element_size(), (name, e)
    # The op's outputs themselves: one stacked [E, ...] tensor per list.
    out = torch.ops.blazec.moe_experts_backward(
        torch.ones_like(y), case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"],
        w["b_gate"], w["b_up"], w["b_down"],
        torch.ops.blazec.moe_experts(case.x, case.tw, sp, eo, pp, w["w_gate"], w["w_up"], w["w_down"],
                                     w["b_gate"], w["b_up"], w["b_down"], case.activation,
                                     case.weight_pos)[1].detach(),
        case.activation, case.weight_pos, False)
    shapes = [[tuple(g.shape) for g in lst] for lst in out[2:]]
    E, I, d = case.E, case.I, case.d
    assert shapes == [[(E, I, d)], [(E, I, d)], [(E, d, I)], [(E, I)], [(E, I)], [(E, d)]], shapes
