"""Parse one expert's MLP out of a torch-level graph, and combine E parsed experts into op inputs.

An expert is recognized from its output back to its input rows:

    out = linear(h, Wd, bd)                       # or  h @ Wd
    h   = act(g) * u        (gated: swiglu, geglu)  or  act(g)  (gelu, relu, silu)
    g   = linear(rows, Wg, bg)                    # or  rows @ Wg, or chunk(linear(rows, Wgu), 2)[0]
    u   = linear(rows, Wu, bu)                    # or  chunk(...)[1]

A weight is a parameter used as it is (per-expert ModuleList), or ``P[e]`` of a stacked 3-D
parameter. Every weight is described by a :class:`WeightRef` that says how to get the
``[out, in]`` matrix the blaze op wants as a *view* of the parameter (transpose for the
``@`` form, a row slice for a fused gate/up projection), so nothing is copied per step.
Anything else in the expert (another op, another input) raises :class:`NoMatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

from blazec.passes._fx import (
    MATMUL,
    NoMatch,
    arg,
    check_no_rounding,
    dtype,
    is_cast,
    is_fn,
    is_getitem,
    is_linear,
    is_method,
    is_mul,
    shape,
    strip_casts,
    val,
    where_loc,
)

Node = torch.fx.Node


@dataclass(frozen=True)
class WeightRef:
    """How expert ``e``'s matrix (or bias) is obtained from a parameter node."""

    base: Node  # the parameter (placeholder or get_attr)
    index: int | None  # e when the parameter is stacked and selected with P[e]
    transposed: bool = False  # the ``rows @ W`` form: W is [in, out]
    rows: tuple[int, int] | None = None  # a slice of the output features (fused gate/up)
    squeeze: int | None = None  # a size-1 dim to drop first (a bmm bias [E, 1, out])

    def layout(self) -> tuple:
        """Everything but the expert-specific part, for checking experts agree."""
        return (self.index is None, self.transposed, self.rows, self.squeeze,
                self.base if self.index is not None else None)


@dataclass
class ExpertMLP:
    activation: str
    gate: WeightRef
    up: WeightRef | None
    down: WeightRef
    b_gate: WeightRef | None
    b_up: WeightRef | None
    b_down: WeightRef | None
    weight_in_hidden: Node | None = None  # the routing-weight factor, when it scales h before down
    nodes: set[Node] = field(default_factory=set)

    def refs(self) -> tuple[WeightRef | None, ...]:
        """The weights and biases, in the order of ``REF_NAMES`` (the op's list arguments)."""
        return tuple(getattr(self, a) for a in REF_NAMES)

    def signature(self) -> tuple:
        return (self.activation, self.weight_in_hidden is not None) + tuple(
            None if r is None else r.layout() for r in self.refs()
        )


# The op's six weight and bias lists, in its argument order.
REF_NAMES = ("gate", "up", "down", "b_gate", "b_up", "b_down")


@dataclass
class FinalMatch:
    """A matched site whose result is one node (``final``) that the blaze op replaces."""

    final: Node
    ids: Node  # [T, k] expert ids
    weights: Node  # [T, k] routing weights, exactly the tensor the code used
    x: Node  # [T, d] expert input
    top_k: int
    experts: dict[int, "ExpertMLP"]
    links: set[Node] = field(default_factory=set)  # the site's in-place nodes that die with it

    def routing(self, graph: torch.fx.Graph) -> tuple[Node, Node]:
        """(ids [T, k], weights [T, k]) as graph nodes."""
        return self.ids, self.weights


GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


def _activation(node: Node) -> tuple[str, Node] | None:
    """(name, input) for a supported activation call, else None."""
    if is_fn(node, F.silu, torch.nn.functional.silu) and not arg(node, 1, "inplace", False):
        return "silu", node.args[0]
    if is_fn(node, F.relu, torch.relu) and not arg(node, 1, "inplace", False):
        return "relu", node.args[0]
    if is_method(node, "relu"):
        return "relu", node.args[0]
    if is_fn(node, F.gelu, torch._C._nn.gelu):
        approx = arg(node, 1, "approximate", "none")
        if approx == "none":
            return "gelu", node.args[0]
        if approx == "tanh":
            return "gelu_tanh", node.args[0]
    return None


def _param_ref(w: object, expert: int, what: str) -> WeightRef:
    """A weight operand: a parameter, or ``P[e]`` of a stacked parameter."""
    if isinstance(w, Node) and w.op in ("placeholder", "get_attr"):
        return WeightRef(w, None)
    if is_getitem(w) and isinstance(w.args[0], Node) and w.args[0].op in ("placeholder", "get_attr"):
        idx = w.args[1]
        if isinstance(idx, int):
            if idx != expert:
                raise NoMatch(f"expert {expert} uses {what} slice [{idx}] of a stacked parameter, not [{expert}]")
            return WeightRef(w.args[0], idx)
    raise NoMatch(f"expert {expert}: {what} is {_spelled(w)}, not a parameter or a stacked parameter "
                  f"indexed by the expert (P or P[e], as the linear or matmul reads it)")


def _spelled(w: object) -> str:
    """A short description of a graph value, for near-miss reasons: ``transpose(getitem(w2))``."""
    if not isinstance(w, Node):
        return repr(w)
    parts, n = [], w
    for _ in range(4):
        if n.op in ("placeholder", "get_attr"):
            parts.append(n.name)
            break
        parts.append(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
        n = n.args[0] if n.args and isinstance(n.args[0], Node) else None
        if n is None:
            break
    return "(".join(parts) + ")" * (len(parts) - 1)


def _check_not_detached(node: object, expert: int, what: str, operands: bool = False) -> None:
    """A NoMatch that names ``node`` when it is a ``detach()`` (with ``operands``, also when one
    of its operands is: a detached routing weight scales the output): eager cuts the gradient
    there and the op would not. Without it the reason named the mismatch the detach led to
    ("gate projection does not read the expert's gathered rows"). A projection's input is
    checked alone: in ``rows * s.detach()`` the product, not the detach, is what fails."""
    if not isinstance(node, Node):
        return
    for n in (node, *(a for a in node.args if isinstance(a, Node) and operands)):
        if is_method(n, "detach") or is_fn(n, torch.detach, torch.ops.aten.detach.default):
            raise NoMatch(f"expert {expert}: {what} reads {_spelled(n)} ({where_loc(n)}); detach() cuts a "
                          f"gradient there that the blaze op would pass")


def _proj(node: Node, rows: Node, expert: int, nodes: set[Node], what: str) -> tuple[WeightRef, WeightRef | None]:
    """Parse ``linear(rows, W, b)`` / ``rows @ W`` / ``chunk(linear(rows, W), 2)[i]``."""
    chunk_rows = None
    if is_getitem(node) and (is_method(node.args[0], "chunk") or is_fn(node.args[0], torch.chunk)):
        ch = node.args[0]
        n_chunks, dim = arg(ch, 1, "chunks"), arg(ch, 2, "dim", 0)
        src_shape = shape(ch.args[0])
        if n_chunks != 2 or src_shape is None or dim not in (-1, len(src_shape) - 1):
            raise NoMatch(f"expert {expert}: {what} comes from a chunk that is not 2 halves of the last dim")
        width = int(src_shape[-1])
        if width % 2:
            raise NoMatch(f"expert {expert}: fused projection width {width} is odd")
        half = width // 2
        i = node.args[1]
        chunk_rows = (0, half) if i == 0 else (half, width)
        nodes.update({node, ch})
        node = ch.args[0]
    if is_linear(node):
        if node.args[0] is not rows:
            _check_not_detached(node.args[0], expert, f"{what} projection")
            raise NoMatch(f"expert {expert}: {what} projection does not read the expert's gathered rows")
        w = _param_ref(arg(node, 1, "weight"), expert, f"{what} weight")
        b = arg(node, 2, "bias")
        bref = None if b is None else _param_ref(b, expert, f"{what} bias")
    elif is_fn(node, *MATMUL):
        if node.args[0] is not rows:
            _check_not_detached(node.args[0], expert, f"{what} matmul")
            raise NoMatch(f"expert {expert}: {what} matmul does not read the expert's gathered rows")
        w = _param_ref(node.args[1], expert, f"{what} weight")
        w = WeightRef(w.base, w.index, transposed=True)
        bref = None
    else:
        raise NoMatch(f"expert {expert}: {what} is {_describe(node)}, not a linear/matmul of the rows")
    nodes.add(node)
    if chunk_rows is not None:
        w = WeightRef(w.base, w.index, w.transposed, chunk_rows)
        if bref is not None:
            bref = WeightRef(bref.base, bref.index, False, chunk_rows)
    return w, bref


def _describe(node: object) -> str:
    if not isinstance(node, Node):
        return repr(node)
    t = node.target
    return f"{node.op} {getattr(t, '__name__', t)}"


def parse_expert(out: Node, rows: Node, expert: int, is_routing_weight) -> ExpertMLP:
    """Parse the expert MLP whose output is ``out`` and whose input is ``rows``."""
    nodes: set[Node] = set()
    if is_linear(out):
        h = out.args[0]
        down = _param_ref(arg(out, 1, "weight"), expert, "down weight")
        bd = arg(out, 2, "bias")
        b_down = None if bd is None else _param_ref(bd, expert, "down bias")
    elif is_fn(out, *MATMUL):
        h = out.args[0]
        d = _param_ref(out.args[1], expert, "down weight")
        down, b_down = WeightRef(d.base, d.index, transposed=True), None
    else:
        _check_not_detached(out, expert, "output", operands=True)
        raise NoMatch(f"expert {expert}: output is {_describe(out)}, not a linear/matmul down projection")
    nodes.add(out)

    weight_in_hidden = None
    h, casts = strip_casts(h)
    nodes.update(casts)
    rounding = None  # a cast that strip_casts kept: it can round
    if is_cast(h):
        rounding = h
        h, casts = strip_casts(h.args[0])
        nodes.update(casts)
    if is_mul(h):
        a, b = h.args[0], h.args[1]
        for w, other in ((a, b), (b, a)):
            if is_routing_weight(w):  # the routing weight scales h before the down projection
                nodes.update({h, w})
                weight_in_hidden, h = w, other
                break
    if rounding is not None:  # the op rounds w * h to h's dtype (x's), once; no other rounding
        if weight_in_hidden is None or dtype(h) is None or dtype(rounding) != dtype(h):
            check_no_rounding(rounding, f"inside the expert computation of expert {expert}")
        nodes.add(rounding)

    act = _activation(h)
    if act is not None:  # non-gated: h = act(g)
        name, g = act
        nodes.add(h)
        gate, b_gate = _proj(g, rows, expert, nodes, "gate")
        return ExpertMLP(name, gate, None, down, b_gate, None, b_down, weight_in_hidden, nodes)
    if not is_mul(h):
        raise NoMatch(f"expert {expert}: hidden is {_describe(h)}, not act(g) or act(g) * u")
    nodes.add(h)
    for a_node, u_node in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        act = _activation(a_node) if isinstance(a_node, Node) else None
        if act is not None and act[0] in GATED:
            name, g = act
            nodes.add(a_node)
            gate, b_gate = _proj(g, rows, expert, nodes, "gate")
            up, b_up = _proj(u_node, rows, expert, nodes, "up")
            return ExpertMLP(GATED[name], gate, up, down, b_gate, b_up, b_down, weight_in_hidden, nodes)
    raise NoMatch(f"expert {expert}: hidden is a product without a supported gated activation (silu/gelu)")


# ---------------------------------------------------------------------------------------
# Emitting the op's weight lists


def weight_list(graph: torch.fx.Graph, refs: list[WeightRef | None], expert_count: int) -> list[Node]:
    """Graph nodes for the op's list argument: ``[P']`` for stacked, ``[W_0', ..., W_E-1']`` else.

    ``'`` applies the ref's transform as a view: transpose to [out, in], then the row slice.
    """
    return _views(refs, lambda r, stacked: _transform(
        r, r.base, len(shape(r.base) or ()), stacked, lambda fn, *a: graph.call_function(fn, a)))


def weight_values(refs: list[WeightRef | None]) -> list | None:
    """The op's list argument as ``weight_list`` builds it, made of the parameters' example
    values instead of graph nodes; None where a parameter has no example value."""
    def one(r: WeightRef, stacked: bool):
        v = val(r.base)
        return _transform(r, v, v.dim(), stacked, lambda fn, *a: fn(*a)) if isinstance(v, torch.Tensor) else None

    out = _views(refs, one)
    return None if any(v is None for v in out) else out


def _views(refs: list[WeightRef | None], one) -> list:
    if refs[0] is None:
        return []
    if refs[0].index is not None:  # stacked: one 3-D (or 2-D bias) view of the whole parameter
        return [one(refs[0], True)]
    return [one(r, False) for r in refs]


def _transform(ref: WeightRef, t, nd: int, stacked: bool, call):
    """``ref``'s view of ``t`` (a node or a tensor of ``nd`` dims), each step made by ``call(fn, *args)``."""
    if ref.squeeze is not None:
        t = call(torch.squeeze, t, ref.squeeze)
        nd -= 1
    if ref.transposed:
        t = call(torch.transpose, t, -1, -2)
    if ref.rows is not None:
        a, b = ref.rows
        # weights: rows are dim -2 ([.., out, in]); biases: dim -1 ([.., out])
        is_bias = nd - (1 if stacked else 0) == 1
        t = call(torch.narrow, t, -1 if is_bias else -2, a, b - a)
    return t


def check_consistent(experts: dict[int, ExpertMLP]) -> None:
    """All experts must compute the same function of their own weights."""
    sigs = {e: m.signature() for e, m in experts.items()}
    first_e = min(sigs)
    for e, s in sorted(sigs.items()):
        if s != sigs[first_e]:
            a, b = experts[first_e], experts[e]
            if a.activation != b.activation:
                raise NoMatch(f"expert {e} uses activation {b.activation}, expert {first_e} uses {a.activation}")
            raise NoMatch(f"expert {e} is built differently from expert {first_e} (weights, biases or layout)")
    refs0 = experts[first_e]
    # Per-expert 2-D weights must really be 2-D; stacked ones must come from one parameter.
    for attr in ("gate", "up", "down"):
        r = getattr(refs0, attr)
        if r is None:
            continue
        nd = len(shape(r.base) or ())
        if r.index is None and nd != 2:
            raise NoMatch(f"{attr} weight of expert {first_e} is {nd}-D, expected a 2-D matrix")
        if r.index is not None and nd != 3:
            raise NoMatch(f"{attr} weight is a {nd}-D stacked parameter, expected 3-D")

