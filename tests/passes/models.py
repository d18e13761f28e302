"""Toy MoE layers for the moe_dispatch pass tests, and helpers to compile them and read reports.

:class:`LoopMoE` is the naive static loop over experts, configurable in every spelling the
pass claims to match (see :class:`Cfg`). The tests build variants of it (and subclasses that
break one condition of the pattern) and compare blaze against eager.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import blazec.ops  # noqa: F401 - registers torch.ops.blazec.*
from blazec import report
from blazec.backend import blaze
from tests.helpers import blaze_unless_unchanged

GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
PLAIN = ("gelu", "gelu_tanh", "relu", "silu")
ACTIVATIONS = (*GATED, *PLAIN)

LAYOUTS = (
    "modulelist",  # nn.ModuleList of experts with nn.Linear gate/up/down
    "modulelist_fused",  # nn.Linear(d, 2I) gate_up, .chunk(2, dim=-1)
    "stacked_linear",  # 3-D params, F.linear(rows, W[e], b[e])
    "stacked_fused",  # 3-D gate_up [E, 2I, d], F.linear(rows, W[e]).chunk(2, dim=-1)
    "stacked_matmul",  # 3-D params [E, in, out], rows @ W[e]
    "stacked_matmul_fused",  # (rows @ Wgu[e]).chunk(2, dim=-1), Wgu [E, d, 2I]
    "stacked_matmul_method",  # rows.matmul(W[e]) (DBRX's spelling)
)
MASKS = ("permute210", "permute201", "eq")
SELECTS = ("where", "nonzero")
ROWS = ("index", "none_reshape", "index_select")
WSPELL = ("none", "unsqueeze")
ACCS = ("zeros", "zeros_like", "new_zeros")
WEIGHT_POS = ("output", "hidden")


def act_fn(name: str, g: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(g)
    if name == "gelu":
        return F.gelu(g)
    if name == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if name == "relu":
        return F.relu(g)
    raise ValueError(name)


@dataclass(frozen=True)
class Cfg:
    layout: str = "modulelist"
    activation: str = "swiglu"
    bias: bool = False
    weight_pos: str = "output"  # routing weight applied after the down projection or on the hidden
    mask: str = "permute210"  # one_hot(ids).permute(2,1,0)[e], .permute(2,0,1)[e], or ids == e
    select: str = "where"  # torch.where(mask) or mask.nonzero(as_tuple=True)
    rows: str = "index"  # x[tok], x[None, tok].reshape(-1, d), index_select(x, 0, tok)
    wspell: str = "none"  # w[tok, slot, None] or w[tok, slot].unsqueeze(-1)
    acc: str = "zeros"  # zeros((T, d)), zeros_like(x), x.new_zeros((T, d))
    cast: bool = True  # index_add_(0, tok, contrib.to(acc.dtype)) or without the cast
    d: int = 16
    inter: int = 12
    num_experts: int = 4
    top_k: int = 2

    def __post_init__(self):
        assert self.layout in LAYOUTS and self.activation in ACTIVATIONS
        assert self.mask in MASKS and self.select in SELECTS and self.rows in ROWS
        assert self.wspell in WSPELL and self.acc in ACCS and self.weight_pos in WEIGHT_POS
        assert 1 <= self.top_k <= self.num_experts

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def form(self) -> str:
        return "static_loop_modulelist" if self.layout.startswith("modulelist") else "static_loop_stacked"

    def valid(self) -> "Cfg":
        """The nearest valid config: fused layouts need a gated activation, ``@`` has no bias."""
        c = self
        if "fused" in c.layout and not c.gated:
            unfused = {"modulelist_fused": "modulelist", "stacked_fused": "stacked_linear",
                       "stacked_matmul_fused": "stacked_matmul"}
            c = dataclasses.replace(c, layout=unfused[c.layout])
        if "matmul" in c.layout and c.bias:
            c = dataclasses.replace(c, bias=False)
        return c

    def label(self) -> str:
        base = Cfg()
        diff = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)]
        return ",".join(diff) or "default"


class Expert(nn.Module):
    """One expert of the ModuleList layout."""

    def __init__(self, cfg: Cfg, activation: str | None = None):
        super().__init__()
        d, inter, b = cfg.d, cfg.inter, cfg.bias
        self.activation = activation or cfg.activation
        self.fused = cfg.layout == "modulelist_fused"
        if self.activation in GATED:
            if self.fused:
                self.gate_up = nn.Linear(d, 2 * inter, bias=b)
            else:
                self.gate = nn.Linear(d, inter, bias=b)
                self.up = nn.Linear(d, inter, bias=b)
        else:
            self.gate = nn.Linear(d, inter, bias=b)
        self.down = nn.Linear(inter, d, bias=b)

    def hidden(self, rows):
        if self.activation in GATED:
            if self.fused:
                g, u = self.gate_up(rows).chunk(2, dim=-1)
            else:
                g, u = self.gate(rows), self.up(rows)
            return act_fn(GATED[self.activation], g) * u
        return act_fn(self.activation, self.gate(rows))

    def forward(self, rows, hidden_scale=None):
        h = self.hidden(rows)
        if hidden_scale is not None:
            h = h * hidden_scale
        return self.down(h)


class LoopMoE(nn.Module):
    """Router (linear, softmax, top-k, renormalize) + the naive static loop over experts.

    Input ``x [T, d]``; output ``[T, d]``. ``router_offset`` (a buffer, zeros by default) is
    added to the router logits, so tests can force skewed routing (one expert gets every
    token, some experts get none).
    """

    def __init__(self, cfg: Cfg = Cfg()):
        super().__init__()
        cfg = cfg.valid()
        self.cfg = cfg
        d, inter, E = cfg.d, cfg.inter, cfg.num_experts
        self.router = nn.Linear(d, E, bias=False)
        self.register_buffer("router_offset", torch.zeros(E))
        if cfg.layout.startswith("modulelist"):
            self.experts = nn.ModuleList(Expert(cfg) for _ in range(E))
        else:
            s_in, s_h = d**-0.5, inter**-0.5
            gw = 2 * inter if "fused" in cfg.layout else inter
            if "matmul" in cfg.layout:  # [E, in, out]
                self.w_gate = nn.Parameter(torch.randn(E, d, gw) * s_in)
                self.w_down = nn.Parameter(torch.randn(E, inter, d) * s_h)
            else:  # [E, out, in], F.linear
                self.w_gate = nn.Parameter(torch.randn(E, gw, d) * s_in)
                self.w_down = nn.Parameter(torch.randn(E, d, inter) * s_h)
            if cfg.gated and "fused" not in cfg.layout:
                self.w_up = nn.Parameter(torch.randn_like(self.w_gate))
            if cfg.bias:
                self.b_gate = nn.Parameter(torch.randn(E, gw) * 0.1)
                self.b_down = nn.Parameter(torch.randn(E, d) * 0.1)
                if cfg.gated and "fused" not in cfg.layout:
                    self.b_up = nn.Parameter(torch.randn(E, gw) * 0.1)

    # ---- pieces the negative tests override ---------------------------------------------

    def route(self, x):
        logits = self.router(x) + self.router_offset
        probs = F.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w, ids

    def expert_mask(self, ids):
        c = self.cfg
        if c.mask == "permute210":
            return F.one_hot(ids, num_classes=c.num_experts).permute(2, 1, 0)  # [E, k, T]
        if c.mask == "permute201":
            return F.one_hot(ids, num_classes=c.num_experts).permute(2, 0, 1)  # [E, T, k]
        return None

    def select(self, mask, ids, e):
        """(tok, slot) of the pairs routed to expert ``e``."""
        c = self.cfg
        m = ids == e if c.mask == "eq" else mask[e]
        pair = torch.where(m) if c.select == "where" else m.nonzero(as_tuple=True)
        if c.mask == "permute210":
            slot, tok = pair
        else:
            tok, slot = pair
        return tok, slot

    def gather(self, x, tok):
        c = self.cfg
        if c.rows == "index":
            return x[tok]
        if c.rows == "none_reshape":
            return x[None, tok].reshape(-1, c.d)
        return torch.index_select(x, 0, tok)

    def routing_weight(self, w, tok, slot):
        if self.cfg.wspell == "none":
            return w[tok, slot, None]
        return w[tok, slot].unsqueeze(-1)

    def new_acc(self, x):
        c = self.cfg
        if c.acc == "zeros":
            return torch.zeros((x.shape[0], c.d), dtype=x.dtype, device=x.device)
        if c.acc == "zeros_like":
            return torch.zeros_like(x)
        return x.new_zeros((x.shape[0], c.d))

    def run_expert(self, e, rows, hidden_scale=None):
        c = self.cfg
        if c.layout.startswith("modulelist"):
            return self.experts[e](rows, hidden_scale)
        fused = "fused" in c.layout
        if "matmul" in c.layout:
            mm = (lambda a, b: a.matmul(b)) if "method" in c.layout else (lambda a, b: a @ b)
            gu = mm(rows, self.w_gate[e])
            if fused:
                g, u = gu.chunk(2, dim=-1)
            elif c.gated:
                g, u = gu, mm(rows, self.w_up[e])
            else:
                g = gu
        else:
            bg = self.b_gate[e] if c.bias else None
            gu = F.linear(rows, self.w_gate[e], bg)
            if fused:
                g, u = gu.chunk(2, dim=-1)
            elif c.gated:
                g, u = gu, F.linear(rows, self.w_up[e], self.b_up[e] if c.bias else None)
            else:
                g = gu
        h = act_fn(GATED[c.activation], g) * u if c.gated else act_fn(c.activation, g)
        if hidden_scale is not None:
            h = h * hidden_scale
        if "matmul" in c.layout:
            return h.matmul(self.w_down[e]) if "method" in c.layout else h @ self.w_down[e]
        return F.linear(h, self.w_down[e], self.b_down[e] if c.bias else None)

    def contribution(self, e, x, w, tok, slot):
        rows = self.gather(x, tok)
        rw = self.routing_weight(w, tok, slot)
        if self.cfg.weight_pos == "hidden":
            return self.run_expert(e, rows, rw)
        return self.run_expert(e, rows) * rw

    def accumulate(self, acc, tok, y):
        acc.index_add_(0, tok, y.to(acc.dtype) if self.cfg.cast else y)

    def experts_range(self):
        return range(self.cfg.num_experts)

    def forward(self, x):
        w, ids = self.route(x)
        acc = self.new_acc(x)
        mask = self.expert_mask(ids)
        for e in self.experts_range():
            tok, slot = self.select(mask, ids, e)
            self.accumulate(acc, tok, self.contribution(e, x, w, tok, slot))
        return acc


def make(cfg: Cfg = Cfg(), T: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    return LoopMoE(cfg), (torch.randn(T, cfg.d),)


# ---------------------------------------------------------------------------------------
# Running and comparing


def strip_prefix(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grad names of a compiled module (``_orig_mod.x``) as the eager module names them."""
    return {k.removeprefix("_orig_mod."): v for k, v in grads.items()}


def train_step(model, inputs):
    """One forward + backward of ``loss_of(out)``: (output, {param: grad}, {input idx: grad})."""
    from tests.helpers import run_train

    out, grads, in_grads = run_train(model, inputs)
    return out, strip_prefix(grads), in_grads


def assert_training_close(got, ref, atol=1e-5, rtol=1e-4, expect_params=None):
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    assert got[1].keys() == ref[1].keys(), (sorted(got[1]), sorted(ref[1]))
    if expect_params is not None:
        assert set(ref[1]) == set(expect_params), "every parameter must get a gradient"
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"grad of {n}: {m}")
    assert got[2].keys() == ref[2].keys() and ref[2], "the input must get a gradient"
    for i in ref[2]:
        torch.testing.assert_close(got[2][i], ref[2][i], atol=atol, rtol=rtol, msg=lambda m: f"grad of x: {m}")


class Spy:
    """A backend: blaze with ``options`` (through tests/helpers.blaze_unless_unchanged: a graph
    the passes leave alone runs as Dynamo captured it), keeping each Dynamo graph, the graph
    its pre-grad passes made (the one blaze compiles) and their reports; ``report.capture``
    gives blaze's own record of it too.
    """

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        self.before: list[torch.fx.GraphModule] = []
        self.after: list[torch.fx.GraphModule] = []
        self.reports: list[Any] = []

    def _pre_grad(self, new_gm, reports) -> None:
        self.after.append(new_gm)
        self.reports.append(reports)

    def __call__(self, gm, example_inputs):
        self.before.append(gm)
        return blaze_unless_unchanged(gm, example_inputs, options=self.options, on_pre_grad=self._pre_grad)


def compile_blaze(model, options=None, **kw):
    return torch.compile(model, backend=functools.partial(blaze, options=options or {}), **kw)


def run_blaze(model, inputs, options=None, **compile_kw):
    """Compile with blaze (via :class:`Spy`), run one training step; returns (step, records, spy)."""
    spy = Spy(options)
    with report.capture() as records:
        compiled = torch.compile(model, backend=spy, **compile_kw)
        step = train_step(compiled, inputs)
    return step, records, spy


def moe_report(rec) -> report.PassReport:
    (rep,) = [r for r in rec.pass_reports if r.name == "moe_dispatch"]
    return rep


# ---------------------------------------------------------------------------------------
# Graph inspection


def _tname(n: torch.fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return str(getattr(t, "__name__", t)) + "|" + str(t)


def targets(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def blaze_op_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    ops = (torch.ops.blazec.moe_experts.default, torch.ops.blazec.moe_route.default,
           torch.ops.blazec.moe_experts, torch.ops.blazec.moe_route)
    return [n for n in gm.graph.nodes if n.op == "call_function" and (n.target in ops or "blazec" in str(n.target))]


def count_target(gm: torch.fx.GraphModule, *needles: str) -> int:
    """Nodes whose target name mentions any of ``needles`` (``where``, ``one_hot``, ...)."""
    return sum(1 for n in targets(gm) if any(s in _tname(n) for s in needles))


DISPATCH_NEEDLES = ("where", "nonzero", "one_hot", "index_add")


def code_lines(text: str) -> list[str]:
    """Lines of a readable graph without its ``# File: ...`` source comments."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def graph_signature(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, _tname(n)) for n in gm.graph.nodes]
