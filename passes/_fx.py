"""Small helpers for matching torch-level Dynamo graphs.

Dynamo graphs spell one operation several ways: ``torch.where(m)`` or ``m.nonzero(as_tuple=True)``,
``F.linear`` as ``torch._C._nn.linear``, ``x.view`` or ``x.reshape``, ``t[0]`` as
``operator.getitem``. These helpers let matchers ask "is this a linear?" or "strip the
casts" without caring about the spelling, and read arguments by name whether they were
passed by position or keyword.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F

from blazec.ops.reference import accumulate_dtype

Node = torch.fx.Node


class NoMatch(Exception):
    """Raised by matchers with the reason a site is not the pattern; becomes a near miss."""


# Node meta key: on a ``moe_route`` whose ids the rewrite derived (GShard's second route), the
# router's own ids node, which moe_gating's report follows back.
ROUTER_IDS = "blazec_router_ids"

# torch 2.11's Dynamo records ``tensor == x`` as ``call_method("__eq__")`` where later versions
# record ``call_function(operator.eq)``; the comparisons are matched under either spelling.
# The method spelling of a function target, where Dynamo records ``t.f(...)`` as a call_method
# with ``t`` first, as the function takes it: ``rows.matmul(W[e])`` is ``torch.matmul(rows, W[e])``.
_DUNDER = {operator.eq: "__eq__", operator.ne: "__ne__", operator.lt: "__lt__", operator.le: "__le__",
           operator.gt: "__gt__", operator.ge: "__ge__", torch.matmul: "matmul", torch.mm: "mm",
           operator.matmul: "__matmul__"}


def is_fn(node: Any, *targets: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return is_method(node, *(_DUNDER[t] for t in targets if t in _DUNDER))
    return node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


# Operators that write their first argument: ``t[i] = v``, ``t += v``.
INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul,
}
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in INPLACE_OPERATORS}  # __setitem__, __iadd__, ...
_SIGNATURES: dict = {}


def written_args(n: Node) -> list:
    """What the call ``n`` writes in place (its arguments, Nodes or not), or [] when it writes
    nothing it is given: ``t.op_()``, ``torch.op_(t)``, ``t[i] = v``, ``t += v``, an aten
    overload whose schema marks an argument written (``aten.mul_.Scalar``), ``f(t, inplace=True)``
    with the flag passed by keyword or by position (``F.hardtanh(t, -1, 1, True)``, as
    ``nn.Hardtanh(inplace=True)`` calls it), ``f(..., out=t)``, and a ``call_module`` of a
    module whose ``inplace`` attribute is set."""
    first = n.args[0] if n.args else None
    out = n.kwargs.get("out")
    written = [out] if out is not None else []
    if n.op == "call_method":
        name = n.target
        if (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS:
            written.insert(0, first)
        return written
    if n.op == "call_module":
        owner = n.graph.owning_module
        try:
            mod = owner.get_submodule(n.target) if owner is not None else None
        except AttributeError:
            mod = None
        return [first] if getattr(mod, "inplace", False) is True else []
    if n.op != "call_function":
        return []
    t = n.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return written + _schema_writes(n)
    name = getattr(t, "__name__", "")
    if t in INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("__")) or _inplace_flag(n):
        # torch._foreach_add_(tensors, ...) writes every tensor of its first argument
        written[:0] = list(first) if isinstance(first, (list, tuple)) else [first]
    return written


def _schema_writes(n: Node) -> list:
    """The arguments an aten (or custom) op's schema marks written (``Tensor(a!)``); for an
    overload packet, those of any of its overloads (taken by position or by name)."""
    t = n.target
    schemas = [t._schema] if isinstance(t, torch._ops.OpOverload) else \
        [getattr(t, o)._schema for o in t.overloads()]
    hits = []
    for schema in schemas:
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = n.args[i] if i < len(n.args) and not a.kwarg_only else n.kwargs.get(a.name)
                if v is not None and all(v is not h for h in hits):
                    hits.append(v)
    return hits


def _inplace_flag(n: Node) -> bool:
    """Whether a call's ``inplace`` parameter is set, by keyword or by position (anything but a
    literal False counts as set)."""
    if "inplace" in n.kwargs:
        return n.kwargs["inplace"] is not False
    t = n.target
    if t not in _SIGNATURES:
        try:
            params = list(inspect.signature(t).parameters)
        except (TypeError, ValueError):
            params = []
        _SIGNATURES[t] = params.index("inplace") if "inplace" in params else None
    i = _SIGNATURES[t]
    return i is not None and i < len(n.args) and n.args[i] is not False


def backed_values(shape_env: Any) -> dict:
    """A ShapeEnv's backed symbols and their example values: ``backed_var_to_val`` from torch
    2.13 on (``var_to_val``, its older name, warns there), ``var_to_val`` before."""
    attr = "backed_var_to_val" if hasattr(shape_env, "backed_var_to_val") else "var_to_val"
    return getattr(shape_env, attr, None) or {}


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, passed by position ``index`` or by keyword.

    For call_method nodes, position 0 is ``self``.
    """
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The example value (a FakeTensor) Dynamo recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_shape(a: Any, b: Any) -> bool:
    """Shapes equal as expressions. Symbolic sizes are compared without guarding on them."""
    sa = a if isinstance(a, tuple) else shape(a)
    sb = b if isinstance(b, tuple) else shape(b)
    return sa is not None and sb is not None and tuple(map(str, sa)) == tuple(map(str, sb))


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


LINEAR = (torch._C._nn.linear, F.linear)
MATMUL = (operator.matmul, torch.matmul, torch.mm)
MUL = (operator.mul, torch.mul)


def is_linear(node: Any) -> bool:
    return is_fn(node, *LINEAR)


def is_mul(node: Any) -> bool:
    return is_fn(node, *MUL) or is_method(node, "mul")


def is_getitem(node: Any) -> bool:
    return is_fn(node, operator.getitem)


def slot_sum_product(final: Any, what: str = "slot") -> Node:
    """The product ``p`` of ``p.sum(dim=1)`` / ``torch.sum(p, 1)`` over a [T, k, d] tensor, in
    its own dtype and without keepdim; NoMatch naming what differs otherwise."""
    prod = slot_sum_input(final, what)
    if not is_mul(prod):
        raise NoMatch(f"the {what} sum is not over expert outputs times routing weights")
    return prod


def slot_sum_input(final: Any, what: str = "slot") -> Any:
    """The input ``p`` of ``p.sum(dim=1)`` / ``torch.sum(p, 1)``, summed in its own dtype and
    without keepdim; NoMatch naming what differs otherwise."""
    if not ((is_method(final, "sum") or is_fn(final, torch.sum)) and arg(final, 1, "dim") in (1, -2)):
        raise NoMatch(f"not a sum over the {what} dimension")
    if arg(final, 2, "keepdim", False) is not False:
        raise NoMatch(f"the {what} sum keeps the {what} dimension (keepdim=True): its result is [T, 1, d], "
                      "not [T, d]")
    if final.kwargs.get("dtype") is not None:
        raise NoMatch(f"the {what} sum runs in {final.kwargs['dtype']}, not in its terms' dtype as the blaze op's")
    return final.args[0]


def flat_of(node: Any) -> Node | None:
    """``t`` for ``t.reshape(-1)`` / ``t.view(-1)`` / ``t.flatten()``, else None."""
    if is_method(node, "flatten") and len(node.args) == 1:
        return node.args[0]
    if is_method(node, "reshape", "view") and tuple(node.args[1:]) in ((-1,), ((-1,),)):
        return node.args[0]
    return None


def eq_mask(node: Any) -> tuple[Node, int] | None:
    """(ids, e) for a comparison with a constant expert index: ``ids == e``, ``e == ids``,
    ``ids.eq(e)``, ``torch.eq(ids, other=e)``; None for another comparison or no comparison."""
    if not (is_fn(node, operator.eq, torch.eq) or is_method(node, "eq")):
        return None
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    if not isinstance(b, int) or isinstance(b, bool):
        a, b = b, a
    if not isinstance(b, int) or isinstance(b, bool) or not isinstance(a, Node):
        return None
    return a, b


def last_dim_broadcast(node: Any) -> Node | None:
    """``t`` for ``t.unsqueeze(-1)``, ``t.unsqueeze(2)``, ``t[..., None]`` or ``t[:, :, None]``
    of a 2-D ``t`` (routing weights or a gate broadcast over d), else None."""
    full = slice(None, None, None)
    if is_method(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 2):
        src = node.args[0]
    elif is_getitem(node) and isinstance(node.args[1], tuple) and node.args[1] in ((full, full, None),
                                                                                  (Ellipsis, None)):
        src = node.args[0]
    else:
        return None
    return src if isinstance(src, Node) and len(shape(src) or ()) == 2 else None


def weighted_rows(prod: Node) -> tuple[Any, Node] | None:
    """(rows, w) for a product ``rows * w.unsqueeze(-1)`` (either order, any
    :func:`last_dim_broadcast` spelling), else None."""
    for a, b in ((prod.args[0], prod.args[1]), (prod.args[1], prod.args[0])):
        w = last_dim_broadcast(b)
        if w is not None:
            return a, w
    return None


CASTS = ("to", "float", "half", "bfloat16", "double", "type_as", "contiguous")

# Float dtypes each dtype converts to exactly: every value of the key is a value of these.
_EXACT_WIDER = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


def is_cast(node: Any) -> bool:
    """A ``.to(dtype)``, ``.type_as``, ``.float()`` style cast or ``.contiguous()``."""
    return is_method(node, *CASTS) and _cast_only(node)


def exact_cast(node: Node) -> bool:
    """A cast that cannot change a value, by the dtypes of the example values.

    ``.contiguous()``; the same dtype; an exact float widening (fp16/bf16 -> fp32/fp64, fp32 ->
    fp64); a bool input (0 and 1 are exact in every dtype). Casts of integer tensors (ids,
    counts, offsets) to a non-bool dtype are index data the matchers check structurally; a float
    value that reaches one went through a float-to-integer cast first, which is not exact.
    An unknown dtype is not exact.
    """
    if node.target == "contiguous":
        return True
    src, dst = dtype(node.args[0]), dtype(node)
    if src is None or dst is None:
        return False
    if src == dst or dst in _EXACT_WIDER.get(src, ()) or src == torch.bool:
        return True
    return not src.is_floating_point and not src.is_complex and dst != torch.bool


def strip_casts(node: Any, exact: bool = True) -> tuple[Any, list[Node]]:
    """Follow casts down to their input, outermost first in the returned list.

    By default only casts that cannot change a value (:func:`exact_cast`): a matcher that
    ignores a cast must not change the numbers. ``exact=False`` follows every dtype cast, for
    code that only reads the graph's structure (reports).
    """
    casts = []
    while is_cast(node) and (not exact or exact_cast(node)):
        casts.append(node)
        node = node.args[0]
    return node, casts


def check_no_rounding(node: Any, what: str) -> None:
    """Raise NoMatch naming ``node`` if it is a cast that strip_casts kept (one that can round)."""
    if not is_cast(node):
        return
    dt = dtype(node)
    to = f"a cast to {dt}" if dt is not None else "a cast of unknown dtype"
    raise NoMatch(f"{to} {what} ({where_loc(node)}) rounds values the blaze op would not round; left alone")


def check_combine_dtypes(what: str, out: torch.dtype | None, contrib: Node, y: Node, x: Node, w: Node,
                         contrib_casts: list[Node], y_casts: list[Node]) -> None:
    """Raise NoMatch unless eager's arithmetic, with the exact casts ignored, runs in the op's dtypes.

    ``y`` is an expert's output (its down projection), ``contrib`` the product of ``y`` and the
    routing weight ``w`` (``y`` itself when the weight scales the hidden state), ``out`` the dtype
    eager sums the contributions in; ``y_casts`` and ``contrib_casts`` are the exact casts ignored
    after ``y`` and after ``contrib`` (as strip_casts lists them). The op multiplies ``y`` by
    ``w`` in their promoted dtype, sums in ``accumulate_dtype`` and casts the sum to ``out``. A widening cast before the multiply, or one that makes eager sum in
    a dtype other than the contribution's or the op's, would change the numbers.
    """
    xd, wd, yd, cd = dtype(x), dtype(w), dtype(y), dtype(contrib)
    if None in (xd, wd, yd, cd, out):
        raise NoMatch(f"{what}: unknown dtypes around its contribution")
    # y is in x's dtype but under autocast, which moe_site_checks refuses with its own reason
    if contrib is not y and cd != torch.promote_types(yd, wd):
        c = _first_widening(y_casts) or contrib
        raise NoMatch(f"{what}: its output is cast to {cd} ({where_loc(c)}) before the routing-weight multiply, "
                      f"which then runs in {cd} where the blaze op multiplies in {torch.promote_types(yd, wd)}; "
                      "left alone")
    acc = accumulate_dtype(xd, wd)
    if out not in (cd, acc):
        c = _first_widening(contrib_casts) or contrib
        raise NoMatch(f"{what}: its contribution is cast from {cd} to {out} ({where_loc(c)}) and summed in {out}, "
                      f"where the blaze op sums in {acc}; left alone")


def _first_widening(casts: list[Node]) -> Node | None:
    """The innermost cast of a strip_casts list that changes the dtype."""
    return next((c for c in reversed(casts) if dtype(c) != dtype(c.args[0])), None)


def _cast_only(node: Node) -> bool:
    """A ``.to`` that only changes dtype (not device, not copy semantics that matter)."""
    if node.target != "to":
        return True
    rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dtype", "device")]
    return all(isinstance(a, torch.dtype) for a in rest)


def follow_first_args(node: Any, found, limit: int = 10) -> Node | None:
    """Walk ``args[0]`` from ``node`` until ``found(n)`` holds; that node, or None within ``limit`` steps.

    Expert MLPs and their wrappers chain their data through the first argument, so this finds
    an expert's input (a split chunk, a dispatch einsum) from its output.
    """
    for _ in range(limit):
        if not isinstance(node, Node) or not node.args:
            return None
        if found(node):
            return node
        node = node.args[0]
    return None


def where_loc(node: Node) -> str:
    """A short ``file:line`` for a node, from the stack trace Dynamo recorded."""
    st = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in st.strip().splitlines() if l.strip().startswith("File ")]
    if not lines:
        return node.name
    last = lines[-1]  # File "/path/x.py", line 52, in forward
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    except IndexError:
        return node.name


def module_path(node: Node) -> str:
    """The qualified name of the innermost nn.Module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, _cls = list(stack.values())[-1]
    return _clean_module_path(path)


def source_label(node: Node) -> str:
    """What the user calls the tensor a graph input holds (``experts.0.w1.weight``), from the
    source Dynamo recorded for the placeholder; the node's name otherwise."""
    ga = node.meta.get("grapharg") if node.op == "placeholder" else None
    source = getattr(getattr(ga, "source", None), "name", None)
    if callable(source):  # a method in older torch releases
        source = source()
    if not isinstance(source, str):
        return node.name
    label = _clean_module_path(source.replace("._parameters['", ".").replace("._buffers['", "."))
    return node.name if label == "<root>" else label


def _clean_module_path(path: str) -> str:
    # Dynamo names look like "L['self'].experts" or "L['self']._modules['experts']".
    p = path.replace("L['self']", "").replace("._modules['", ".").replace("']", "")
    p = p.replace("['", ".")
    return p.lstrip(".") or "<root>"


def combine_args(ia: Node) -> tuple[Any, Any]:
    """(token index, rows) of ``acc.index_add_(0, tok, rows)`` or of
    ``acc.scatter_add(0, tok.reshape(-1, 1).expand(-1, d), rows)`` (the same sum by token; also
    ``tok.unsqueeze(-1)``, ``tok[:, None]`` or ``tok[..., None]``, and ``.expand_as(rows)``), in
    place or not."""
    if is_method(ia, "index_add_", "index_add") or is_fn(ia, torch.index_add):
        if arg(ia, 1, "dim") not in (0, -2) or ia.kwargs.get("alpha", 1) != 1 or len(ia.args) > 4:
            raise NoMatch("index_add_ is not along dim 0 with alpha 1")
        return arg(ia, 2, "index"), arg(ia, 3, "source")
    if is_method(ia, "scatter_add_", "scatter_add") or is_fn(ia, torch.scatter_add):
        if arg(ia, 1, "dim") not in (0, -2):
            raise NoMatch("scatter_add is not along dim 0")
        index, src = arg(ia, 2, "index"), arg(ia, 3, "src")
        # Every row of src (S of them, as many as tokens in tok) lands in its token's row:
        # the index must cover src's full width.
        full_width = str((shape(index) or (None,))[-1]) == str((shape(src) or (0,))[-1])
        if is_method(index, "expand", "expand_as") and full_width:
            inner = index.args[0]
            if is_method(inner, "reshape", "view") and tuple(inner.args[1:]) in ((-1, 1), ((-1, 1),)):
                return inner.args[0], src
            if is_method(inner, "unsqueeze") and arg(inner, 1, "dim") in (-1, 1):
                return inner.args[0], src
            if is_getitem(inner) and inner.args[1] in ((slice(None, None, None), None), (Ellipsis, None)):
                return inner.args[0], src
        raise NoMatch("the scatter_add index is not the token index broadcast over the rows' columns")
    raise NoMatch("the combine is neither index_add_ nor scatter_add")


def canonical_equation(eq: str) -> str:
    """An einsum equation with its subscripts renamed in order of first appearance, spaces
    dropped and the output made explicit: ``"sec,sm->ecm"`` (DeepSpeed's dispatch) and
    ``"tec,td->ecd"`` are both ``"abc,ad->bcd"``. Einsum's meaning depends on which positions
    share a subscript, not on the letters, so equal canonical forms compute the same thing."""
    eq = eq.replace(" ", "")
    if "->" not in eq:  # implicit output: the subscripts seen once, in alphabetical order
        letters = [c for c in eq if c.isalpha()]
        eq += "->" + ("..." if "..." in eq else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    names: dict[str, str] = {}
    out = []
    for c in eq:
        if c.isalpha():
            if c not in names:
                names[c] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(names)]
            out.append(names[c])
        else:
            out.append(c)
    return "".join(out)


def einsum_equation(node: Any) -> str | None:
    """The canonical equation (``canonical_equation``) of a ``torch.einsum`` node; None for any
    other node. Compare it with ``canonical_equation`` of the equation a form is written with."""
    if is_fn(node, torch.einsum, torch.functional.einsum) and node.args and isinstance(node.args[0], str):
        return canonical_equation(node.args[0])
    return None


def einsum_operands(node: Node) -> list:
    """The operands of a ``torch.einsum`` node, passed one by one or as one list."""
    ops = list(node.args[1:])
    return list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph (node meta copied); its parameters and
    submodules are ``gm``'s own objects, so a pass edits the copy's graph only."""
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, env, return_output_node=True)
    # graph_copy returns the output node's argument when return_output_node is False;
    # with True it returns (output value, output node) on recent torch, the node alone on older.
    if isinstance(out, tuple):
        out_val, out_node = out
        graph.output(out_val, type_expr=getattr(out_node, "type", None))
    else:
        graph.output(out)
    for old, new in env.items():
        new.meta = dict(old.meta)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


# Higher-order ops whose first operand is a subgraph that runs a region's code as it is:
# torch.utils.checkpoint regions, and torch.compiler.nested_compile_region (one subgraph that
# every call of the region shares).
REGION_HOPS = ("tag_activation_checkpoint", "invoke_subgraph")


class Region(NamedTuple):
    body: torch.fx.GraphModule  # placeholders: the region's inputs (its parameters too)
    kind: str  # the op's name, one of REGION_HOPS
    calls: list  # the op's nodes in the calling graph: (body, *operands), (body, name, *operands)


def regions(gm: torch.fx.GraphModule) -> dict[str, Region]:
    """The checkpoint and nested compile regions ``gm`` calls, by the body's attribute name:
    Dynamo traces a checkpointed call into ``tag_activation_checkpoint(body, *operands)`` and a
    nested compile region into ``invoke_subgraph(body, name, *operands)``, ``body`` a
    GraphModule of ``gm``."""
    hops = {h for h in (getattr(torch.ops.higher_order, name, None) for name in REGION_HOPS) if h is not None}
    out: dict[str, Region] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in hops or not n.args:
            continue
        body = n.args[0]
        if isinstance(body, Node) and body.op == "get_attr" and "." not in body.target:
            mod = getattr(gm, body.target, None)
            if isinstance(mod, torch.fx.GraphModule):
                out.setdefault(body.target, Region(mod, n.target.name(), [])).calls.append(n)
    return out


def graph_node_names(gm: torch.fx.GraphModule) -> dict[str, set[str]]:
    """The names of the nodes of ``gm``'s graph and of its subgraphs, by submodule name: what
    :func:`fill_example_values` leaves alone after a pass."""
    return {name: {n.name for n in mod.graph.nodes} for name, mod in gm.named_modules()
            if isinstance(mod, torch.fx.GraphModule)}


def fill_example_values(gm: torch.fx.GraphModule, before: dict[str, set[str]]) -> int:
    """Give the nodes a pass inserted (those whose names ``before`` does not hold, from
    :func:`graph_node_names`) the ``example_value`` Dynamo records on its own nodes, by running
    each under the graph's fake mode; returns how many got one.

    AOTAutograd's cache takes a graph only when every ``call_method`` reads a node that has
    one: ``moe_experts(...)[0].view(b, s, d)`` sent every rewritten MoE graph around the cache.
    Dynamo's own nodes without one are never run: they include its global-state calls
    (``torch._C._set_grad_enabled``, ``_enter_autocast``), which would change the process's
    state at compile time. A node whose value cannot be computed (or that reads such a node)
    is left without, as before. Fresh unbacked symbols (the expert-parallel count exchange
    makes some) are kept out of the shape environment's pending list, which the tracing that
    follows owns."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensor

    filled = 0
    for name, mod in gm.named_modules():
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        nodes, old = mod.graph.nodes, before.get(name, set())
        missing = [n for n in nodes if n.op in ("call_function", "call_method") and n.name not in old
                   and "example_value" not in n.meta]
        fake = next((v.fake_mode for n in nodes if isinstance(v := n.meta.get("example_value"), FakeTensor)), None)
        if not missing or fake is None:
            continue
        env = fake.shape_env
        grad = grad_modes(mod.graph)
        with fake, (env.ignore_fresh_unbacked_symbols() if env is not None else nullcontext()):
            for n in missing:
                with torch.set_grad_enabled(grad[n]):  # requires_grad as Dynamo's own values have it
                    value = _fake_run(n)
                if value is not None:
                    n.meta["example_value"] = value
                    filled += 1
    return filled


def grad_modes(graph: torch.fx.Graph) -> dict[Node, bool]:
    """Whether grad is enabled at each node: the graph starts in the mode Dynamo traced it in
    (the passes run in it: Dynamo restores it to compile), and ``torch._C._set_grad_enabled``
    calls (a ``torch.no_grad()`` block in the code) change it."""
    enabled, modes = torch.is_grad_enabled(), {}
    for n in graph.nodes:
        if is_fn(n, torch._C._set_grad_enabled) and n.args and isinstance(n.args[0], bool):
            enabled = n.args[0]
        modes[n] = enabled
    return modes


class _NoValue(Exception):
    pass


def _fake_run(n: Node) -> Any:
    def value(a: Node) -> Any:
        if "example_value" not in a.meta:
            raise _NoValue
        return a.meta["example_value"]

    try:
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), value)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no value is what the node had before
        return None
