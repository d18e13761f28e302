"""The checkpoint problem: which forward values the backward can get, and what each costs.

:func:`build_problem` reads a joint forward/backward graph (as AOTAutograd hands it to the
partitioner) and returns a :class:`Problem`:

- a :class:`Vertex` for every node whose value the backward may need: a forward value, a
  graph input, or an "unclaimed" node that depends only on inputs (it may run in either
  graph). Each has a size in bytes as a sympy expression in the graph's symbolic sizes, a
  recompute cost (FLOPs and bytes moved, turned into seconds by a roofline model), and the
  reasons it may not be saved or may not be recomputed;
- the values the backward needs no matter what (``required``);
- a :class:`MoeLayer` for every ``blazec::moe_experts`` whose pre-activations only its
  backward reads: saving ``preact`` or recomputing the first GEMM is a decision too;
- the points (symbol values) at which sizes are evaluated: the size hints, and the declared
  bounds of dynamic sizes.

Memory model. A saved tensor costs the bytes of the storage it keeps alive, once however
many views of it are saved: a view costs its base's bytes unless the base (or another view
of it) is saved too, a view of a graph input costs nothing (inputs and parameters are alive
anyway), and symbolic integers cost nothing. The solvers never save a view of a savable
base (saving the base instead keeps the same storage, and views recompute for free), so
they can add bytes up; :func:`checkpoint_solve.evaluate` counts shared storages once when it
measures any plan, e.g. the default partition's, which saves q, k and v as views of one
matmul.

Recompute model. A forward node recomputed in backward costs
``max(flops / flops_per_s, bytes_moved / bytes_per_s)`` seconds. FLOPs come from
``torch.utils.flop_counter``'s formulas where one is registered (matmuls, convolutions,
attention) and from blaze's own formulas for blaze ops; bytes moved are the node's tensor
inputs plus outputs (zero for views). Unclaimed nodes cost nothing: they run once, in
whichever graph needs them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import sympy
import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from blazec.passes._fx import backed_values

INPUT, FWD, FREE = "input", "fwd", "free"

# In the reason a vertex cannot be saved: an input the forward writes in place (a plan that saves
# or recomputes from it reads the new value in backward; checkpoint.Session tells by these words)
STALE_READ = "is written in place by the forward"

# A roofline machine for turning FLOPs and bytes into seconds. The defaults are those of a
# current datacenter accelerator (dense bf16 ~1e15 FLOP/s is optimistic for real kernels;
# 2e14 is a sustained rate); only ratios matter to the solver.
FLOPS_PER_S = 2e14
BYTES_PER_S = 2e12


@dataclass
class Vertex:
    index: int
    node: torch.fx.Node
    kind: str  # INPUT, FWD or FREE
    inputs: list[int] = field(default_factory=list)
    can_save: bool = True
    no_save_reason: str = ""
    can_recompute: bool = True
    no_recompute_reason: str = ""
    bytes_expr: sympy.Expr = sympy.Integer(0)
    bytes_note: str = ""  # "alias of input x", "view of mm" ...
    flops_expr: sympy.Expr = sympy.Integer(0)
    moved_expr: sympy.Expr = sympy.Integer(0)
    cost: float = 0.0  # seconds at the size hints, 0 unless kind == FWD
    required: bool = False  # the backward reads it whatever the plan
    root: int | None = None  # vertex owning the storage, for a view of another vertex
    view_of_savable: bool = False  # a view whose base can be saved instead
    rng_state_of: int | None = None  # a virtual vertex: the RNG state torch saves to replay it

    @property
    def name(self) -> str:
        return self.node.name if self.rng_state_of is None else f"{self.node.name}.rng_state"

    @property
    def solver_save(self) -> bool:
        """The solvers consider saving it (not views of savable bases: see above)."""
        return self.can_save and not self.view_of_savable


@dataclass
class MoeLayer:
    """One ``blazec::moe_experts`` whose ``recompute`` flag the solver may flip."""

    index: int
    fwd: torch.fx.Node
    bwds: list[torch.fx.Node]
    preact: int  # vertex index of getitem(fwd, 1)
    recompute_now: bool  # the flag in the graph as it came
    preact_bytes_expr: sympy.Expr  # bytes of preact when saved (recompute=False)
    gemm1_flops_expr: sympy.Expr
    gemm1_cost: float  # seconds at the hints to recompute GEMM1 in backward

    @property
    def name(self) -> str:
        return self.fwd.name


@dataclass
class Point:
    """Values for the graph's symbols at which sizes are evaluated."""

    label: str  # "hint", "lower bounds", "declared max", "asymptotic (hint x 1024)"
    subs: dict[sympy.Symbol, int]

    def describe(self) -> str:
        if not self.subs:
            return self.label
        vals = ", ".join(f"{k}={v}" for k, v in sorted(self.subs.items(), key=lambda kv: str(kv[0])))
        return f"{self.label} ({vals})"


@dataclass
class Problem:
    vertices: list[Vertex]
    layers: list[MoeLayer]
    points: list[Point]  # points[0] is the size hints
    bytes_at: list[list[int]]  # bytes_at[point][vertex]
    layer_bytes_at: list[list[int]]  # layer_bytes_at[point][layer]: preact bytes when saved
    forward_cost: float  # seconds: every forward node once, the reference for overhead
    forward_flops: float
    symbols: list[sympy.Symbol]
    declared_max: bool  # some symbol has a finite declared upper bound
    notes: list[str] = field(default_factory=list)
    by_node: dict[torch.fx.Node, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.vertices)

    def vertex(self, node: torch.fx.Node) -> Vertex | None:
        i = self.by_node.get(node)
        return None if i is None else self.vertices[i]

    def eval_expr(self, expr: sympy.Expr, point: int = 0) -> int:
        return _eval_int(expr, self.points[point].subs)


# ---------------------------------------------------------------------------------------
# Node classification


def _is_tangent(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and "tangents" in str(node.target)


def _is_blaze(node: torch.fx.Node, name: str) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "blazec" and t._schema.name == f"blazec::{name}"


def _is_mutable(node: torch.fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def _is_random(node: torch.fx.Node) -> bool:
    """Draws from the RNG. Attention ops are tagged random for their dropout; with
    ``dropout_p == 0`` they are deterministic."""
    t = node.target
    tags = getattr(t, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    schema = getattr(t, "_schema", None)
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            if a.name == "dropout_p":
                p = node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
                return not (isinstance(p, (int, float)) and p == 0)
    return True


def _is_collective(node: torch.fx.Node) -> bool:
    ns = getattr(node.target, "namespace", None)
    return ns in ("_c10d_functional", "c10d_functional", "_dtensor")


def _must_save_tag(node: torch.fx.Node) -> bool:
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get("recompute", None) == CheckpointPolicy.MUST_SAVE


def _must_recompute_tag(node: torch.fx.Node) -> bool:
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get("recompute", None) in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def _partitioner_tag(node: torch.fx.Node) -> str | None:
    return node.meta.get("partitioner_tag", None)


def view_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor a view node aliases (its first aliased input), or None if not a view."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is operator.getitem:
        parent = node.args[0]
        if isinstance(parent, torch.fx.Node) and parent.op == "call_function":
            return view_source(parent) if _returns_alias(parent) else None
        return None
    if _returns_alias(node):
        schema = t._schema
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and not a.alias_info.is_write:
                v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                if isinstance(v, torch.fx.Node):
                    return v
    return None


def _returns_alias(node: torch.fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    rets = t._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


def alias_root(node: torch.fx.Node) -> torch.fx.Node:
    seen = 0
    while True:
        src = view_source(node)
        if src is None or seen > 1000:
            return node
        node = src
        seen += 1


# ---------------------------------------------------------------------------------------
# Sizes


def sym_expr(s: Any) -> sympy.Expr:
    if isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return s.node.expr
    return sympy.sympify(s)


def tensor_bytes_expr(val: torch.Tensor) -> sympy.Expr:
    n = sympy.Integer(1)
    for s in val.shape:
        n = n * sym_expr(s)
    return sympy.expand(n * val.element_size())


def allocated_bytes_expr(val: torch.Tensor) -> sympy.Expr:
    """Bytes of the storage a fresh tensor allocates: ``numel * itemsize`` for a dense one, and
    its strides' span for one that is not (``aten.copy`` of a slice keeps the slice's strides,
    and with them its parent's extent: an [8, 3] copy of a slice of [8, 32] allocates 1 KiB)."""
    try:
        nbytes = val.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, AttributeError):
        return tensor_bytes_expr(val)
    return sympy.expand(sym_expr(nbytes))


def _eval_int(expr: sympy.Expr, subs: dict) -> int:
    if isinstance(expr, (int, float)):
        return int(expr)
    v = expr.xreplace(subs) if subs else expr
    try:
        return int(v)
    except TypeError:
        # a symbol without a value (should not happen): count it as the unbacked fallback
        fb = int(torch._inductor.config.unbacked_symint_fallback)
        return int(v.xreplace({s: fb for s in v.free_symbols}))


def _val_tensors(val: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(val)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _node_bytes_expr(node: torch.fx.Node) -> sympy.Expr:
    vals = _val_tensors(node.meta.get("val"))
    total = sympy.Integer(0)
    for t in vals:
        total = total + tensor_bytes_expr(t)
    return total


def _shape_env(nodes: Iterable[torch.fx.Node]):
    for node in nodes:
        for t in _val_tensors(node.meta.get("val")):
            for s in t.shape:
                if isinstance(s, torch.SymInt):
                    return s.node.shape_env
        v = node.meta.get("val")
        if isinstance(v, torch.SymInt):
            return v.node.shape_env
    return None


def _symbol_hint(shape_env, sym: sympy.Symbol) -> int:
    d = backed_values(shape_env)
    if sym in d:
        try:
            return int(d[sym])
        except TypeError:
            pass
    return int(torch._inductor.config.unbacked_symint_fallback)


def _symbol_range(shape_env, sym: sympy.Symbol) -> tuple[int | None, int | None]:
    vr = getattr(shape_env, "var_to_range", {}).get(sym)
    if vr is None:
        return None, None

    def fin(x):
        try:
            if x.is_finite is False or abs(int(x)) >= 2**62:
                return None
            return int(x)
        except (TypeError, ValueError, AttributeError, OverflowError):
            return None

    return fin(vr.lower), fin(vr.upper)


# ---------------------------------------------------------------------------------------
# Costs


@dataclass
class NodeCost:
    flops: sympy.Expr
    moved: sympy.Expr
    known: bool = True  # False: a custom op without a formula


def _is_free_op(node: torch.fx.Node) -> bool:
    """Ops that move no data: views, getitem, shape queries, detach."""
    if node.target is operator.getitem:
        return True
    if view_source(node) is not None:
        return True
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return False


def _arg_vals(x: Any) -> Any:
    return tree_map(lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a, x)


def _tensor_arg_bytes(node: torch.fx.Node) -> sympy.Expr:
    total = sympy.Integer(0)
    leaves, _ = tree_flatten((node.args, node.kwargs))
    for a in leaves:
        if isinstance(a, torch.fx.Node):
            for t in _val_tensors(a.meta.get("val")):
                total = total + tensor_bytes_expr(t)
    return total


def _experts_dims(node: torch.fx.Node):
    """(S, d, n_in, I, E, itemsize) of a blazec::moe_experts node, sizes as sympy."""
    from blazec.ops.activations import is_gated

    args = list(node.args)
    x = args[0].meta["val"]
    sorted_pairs = args[2].meta["val"]
    w_gate = args[5]
    activation = args[11] if len(args) > 11 else node.kwargs["activation"]
    wg = w_gate[0].meta["val"]
    S = sym_expr(sorted_pairs.shape[0])
    d = sym_expr(x.shape[1])
    I = sym_expr(wg.shape[-2])
    n_in = 2 * I if is_gated(activation) else I
    E = sym_expr(wg.shape[0]) if wg.dim() == 3 else sympy.Integer(len(w_gate))
    return S, d, n_in, I, E, x.element_size()


def experts_gemm1(node: torch.fx.Node) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(flops, bytes moved, preact bytes) of recomputing GEMM1 of a moe_experts node."""
    S, d, n_in, _I, E, isz = _experts_dims(node)
    flops = 2 * S * d * n_in
    moved = isz * (S * d + E * n_in * d + S * n_in)
    return sympy.expand(flops), sympy.expand(moved), sympy.expand(S * n_in * isz)


def node_cost(node: torch.fx.Node) -> NodeCost:
    """FLOPs and bytes moved of running ``node`` once, as sympy expressions."""
    zero = sympy.Integer(0)
    if node.op != "call_function" or _is_free_op(node):
        return NodeCost(zero, zero)
    moved = _tensor_arg_bytes(node) + _node_bytes_expr(node)
    if _is_blaze(node, "moe_experts"):
        S, d, n_in, I, _E, _ = _experts_dims(node)
        # GEMM1 (gate and up), the activation, GEMM2, and the routing-weight scaling
        flops = 2 * S * d * n_in + 2 * S * I * d + 4 * S * I + 2 * S * d
        return NodeCost(sympy.expand(flops), sympy.expand(moved))
    if _is_blaze(node, "moe_route") or _is_blaze(node, "moe_route_sink"):
        return NodeCost(zero, sympy.expand(moved))
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and getattr(target, "namespace", None) in ("aten", "prims"):
        # prims: what Inductor's decompositions leave (convert_element_type, ...): bytes only
        flops = zero
        try:
            from torch.utils.flop_counter import flop_registry

            formula = flop_registry.get(packet)
            if formula is not None:
                args, kwargs = _arg_vals((node.args, node.kwargs))
                flops = sym_expr(formula(*args, out_val=node.meta.get("val"), **kwargs))
        except Exception:  # noqa: BLE001 - a formula that does not apply: count bytes only
            flops = zero
        return NodeCost(sympy.expand(flops), sympy.expand(moved))
    return NodeCost(zero, sympy.expand(moved), known=False)


def seconds(flops: float, moved: float) -> float:
    return max(float(flops) / FLOPS_PER_S, float(moved) / BYTES_PER_S)


# ---------------------------------------------------------------------------------------
# Building the problem


def tangents_closure(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that depend on a tangent or must run in backward: they run in backward only."""
    out: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if _is_tangent(node) or _partitioner_tag(node) == "must_be_in_backward":
            out.add(node)
        elif node.op == "call_function" and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _recompute_ban(node: torch.fx.Node) -> str:
    """Why ``node`` may not run again in backward ("" if it may)."""
    if node.op == "placeholder":
        return "graph input"
    if node.op != "call_function":
        return f"{node.op} node"
    if _must_save_tag(node):
        return "marked MUST_SAVE"
    if _is_collective(node):
        return "collective"
    if _is_random(node) and not _must_recompute_tag(node):
        # (inside a torch.utils.checkpoint region torch replays the RNG state on recompute)
        return "random op (recomputing would draw new values)"
    if _is_mutable(node) or _partitioner_tag(node) == "must_be_in_forward":
        return "mutates its input"
    if "unbacked_bindings" in node.meta and node.meta["unbacked_bindings"]:
        return "data-dependent output size"
    t = node.target
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher-order op {getattr(t, '__name__', t)}"
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "prims" and t.__name__.startswith("inductor_") \
            and not _must_recompute_tag(node):
        # inductor_random / _randint / _lookup_seed are not tagged as random; the values depend
        # on Inductor's seed tensors (its own RNG functionalization), so they stay saved, except
        # inside a checkpoint region, where torch replays them as it does the other random ops
        return "Inductor's random-number op"
    if t is operator.getitem or isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "prims", "blazec"):
        if isinstance(t, torch._ops.OpOverload) and t.namespace == "blazec" and _is_blaze(node, "moe_experts_backward"):
            return "backward op"
        return ""
    if getattr(t, "__module__", "") in ("_operator", "operator", "math", "torch.fx.experimental.sym_node"):
        return ""  # symbolic integer arithmetic
    if isinstance(t, torch._ops.OpOverload):
        return f"custom op {t.namespace}::{t._schema.name.split('::')[-1]} without a cost model"
    return f"unknown call {t}"


def _rng_state_bytes(node: torch.fx.Node) -> int:
    """Bytes of the RNG state torch saves to replay a random op (functionalize_rng_ops):
    the CPU generator's state, or a device generator's seed and offset."""
    dev = next((t.device for t in _val_tensors(node.meta.get("val"))), None)
    if dev is not None and dev.type not in ("cpu", "meta"):
        try:
            from torch._functorch._aot_autograd.utils import supports_graphsafe_rng

            if supports_graphsafe_rng(dev):
                return 16
        except ImportError:
            return 16
    return int(torch.get_rng_state().numel())


def _save_ban(node: torch.fx.Node) -> str:
    from torch.utils.checkpoint import CheckpointPolicy

    val = node.meta.get("val")
    if node.meta.get("recompute", None) in (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE):
        return "marked MUST_RECOMPUTE"
    if isinstance(val, torch.Tensor):
        return ""
    if isinstance(val, (torch.SymInt, torch.SymBool, int, bool)):
        return ""
    if isinstance(val, torch.ScriptObject) or type(val).__name__ in ("FakeScriptObject", "BackwardState"):
        return ""  # opaque objects: saved by reference, no bytes of their own
    if isinstance(val, torch.SymFloat):
        return "symbolic float"
    if val is None:
        return "no value metadata"
    return "not a tensor (a tuple or list of outputs)"


def mutated_inputs(joint_graph: torch.fx.Graph) -> set[torch.fx.Node] | None:
    """The graph inputs the forward writes in place (a buffer's running statistic, an input
    ``x.mul_(2)``), or None where the graph does not say.

    AOTAutograd functionalizes such a write: the joint graph computes the new value and either
    writes it back itself, with a ``copy_`` into the input at the end of the forward (buffers),
    or returns it as a forward output that the runtime copies into the input after the forward
    (the output node's descriptors name those: ``InputMutationAOTOutput``). Either way the
    backward sees the input's new value, so nothing that reads the input may be recomputed
    there, and neither the input nor a view of it may stand for its old value."""
    out: set[torch.fx.Node] = set()
    for node in joint_graph.nodes:
        if node.op == "call_function" and _is_mutable(node):
            for a in _written_args(node):
                root = alias_root(a)
                if root.op == "placeholder" and not _is_tangent(root):
                    out.add(root)
    outs = joint_graph.find_nodes(op="output")
    descs = outs[0].meta.get("desc") if outs else None
    if not isinstance(descs, (list, tuple)):
        return None
    by_desc = {}
    for n in joint_graph.find_nodes(op="placeholder"):
        d = n.meta.get("desc")
        if d is not None:
            by_desc[repr(d)] = n
    for d in descs:
        if type(d).__name__ == "InputMutationAOTOutput":
            node = by_desc.get(repr(getattr(d, "mutated_input", None)))
            if node is None:
                return None  # a write to an input this graph cannot name
            out.add(node)
    return out


# Training-mode batch norms: (running mean, running var) argument positions, the position of
# the ``training`` flag (None: always training) and the outputs that are the new statistics.
# In training mode the normalized output and the saved batch statistics do not depend on the
# running statistics, which the forward then overwrites with the new ones: recomputing the op
# in backward for those outputs is sound, for the new statistics it is not.
_BATCH_NORMS = {
    "_native_batch_norm_legit_functional": ((3, 4), 5, (3, 4)),
    "_batch_norm_with_update_functional": ((3, 4), None, (4, 5)),
}


def _batch_norm(node: torch.fx.Node) -> tuple | None:
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
        return None
    spec = _BATCH_NORMS.get(t._schema.name.split("::")[-1])
    if spec is None:
        return None
    training = True if spec[1] is None else (node.args[spec[1]] if len(node.args) > spec[1] else node.kwargs.get("training"))
    return spec if training is True else None


def _running_stats(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The running-statistic arguments a training-mode batch norm reads only to update them: not
    one that (or a view of which) it also reads as another argument, its weight say."""
    spec = _batch_norm(node)
    if spec is None:
        return set()
    stats = {node.args[i] for i in spec[0] if i < len(node.args) and isinstance(node.args[i], torch.fx.Node)}
    others = [a for i, a in enumerate(node.args) if i not in spec[0]] + list(node.kwargs.values())
    used = {alias_root(a) for a in torch.utils._pytree.tree_leaves(others) if isinstance(a, torch.fx.Node)}
    return {a for a in stats if alias_root(a) not in used}


def _is_new_running_stat(node: torch.fx.Node) -> bool:
    """``getitem(bn, i)`` for a new running statistic of a training-mode batch norm whose value
    something may use: recomputed in backward it would come from the overwritten statistic.
    The forward's write-back (``copy_``) and a training-mode ``native_batch_norm_backward``
    (which takes the running statistics and ignores them) do not use it there."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], torch.fx.Node):
        return False
    spec = _batch_norm(node.args[0])
    if spec is None or node.args[1] not in spec[2]:
        return False
    for u in node.users:
        name = u.target._schema.name.split("::")[-1] if isinstance(u.target, torch._ops.OpOverload) else ""
        if name == "copy_" and u.args[1] is node:
            continue
        if name == "native_batch_norm_backward" and len(u.args) > 7 and u.args[7] is True \
                and node not in (*u.args[:3], *u.args[5:7]):
            continue
        return True
    return False


def _written_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph values a mutable op writes (its schema's ``Tensor(a!)`` arguments)."""
    out = []
    for i, a in enumerate(node.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            out.extend(x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, torch.fx.Node))
    return out


def build_problem(joint_graph: torch.fx.Graph, node_info: Any) -> Problem:
    """The checkpoint problem of a joint graph; ``node_info`` is torch's classification."""
    closure = tangents_closure(joint_graph)
    mutated = mutated_inputs(joint_graph)
    if mutated is None:  # no descriptors: assume any input may be written
        mutated = set(joint_graph.find_nodes(op="placeholder")) - {n for n in joint_graph.nodes if _is_tangent(n)}
        unnamed = True
    else:
        unnamed = False
    required_bw = set(getattr(node_info, "required_bw_nodes", ()))
    is_fw = node_info.is_required_fw

    def in_bw(node: torch.fx.Node) -> bool:
        return node in closure

    # Values the backward reads: inputs of backward-only nodes, plus required backward
    # nodes that do not depend on a tangent (they are outputs the backward must return).
    direct: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    for node in joint_graph.nodes:
        if node.op == "output":
            continue
        if in_bw(node):
            for a in node.all_input_nodes:
                if not in_bw(a) and a.op != "get_attr" and a not in seen:
                    seen.add(a)
                    direct.append(a)
        elif node in required_bw and node not in seen:
            seen.add(node)
            direct.append(node)
    # Every ancestor of those (outside the backward closure) may have to be recomputed.
    order = {n: i for i, n in enumerate(joint_graph.nodes)}
    keep: set[torch.fx.Node] = set()
    stack = list(direct)
    while stack:
        n = stack.pop()
        if n in keep:
            continue
        keep.add(n)
        for a in n.all_input_nodes:
            if a.op != "get_attr" and not in_bw(a) and a not in keep:
                stack.append(a)
    nodes = sorted(keep, key=order.__getitem__)

    vertices: list[Vertex] = []
    by_node: dict[torch.fx.Node, int] = {}
    for node in nodes:
        if node.op == "placeholder":
            kind = INPUT
        elif is_fw(node):
            kind = FWD
        else:
            kind = FREE
        v = Vertex(index=len(vertices), node=node, kind=kind)
        by_node[node] = v.index
        vertices.append(v)
    stale_ok: list[tuple[Vertex, torch.fx.Node]] = []  # (batch norm, running statistic it reads)
    for v in vertices:
        unread = _running_stats(v.node) & mutated  # read only for the new statistics
        stale_ok += [(v, a) for a in unread if a in by_node]
        v.inputs = [by_node[a] for a in v.node.all_input_nodes if a in by_node and a not in unread]
        v.no_recompute_reason = _recompute_ban(v.node)
        v.can_recompute = not v.no_recompute_reason
        if not v.no_recompute_reason and _is_new_running_stat(v.node):
            v.no_recompute_reason = "a new running statistic, computed from an input the forward writes in place"
            v.can_recompute = False
        v.no_save_reason = _save_ban(v.node)
        v.can_save = not v.no_save_reason
        val = v.node.meta.get("val")
        if isinstance(val, torch.Tensor):
            root = alias_root(v.node)
            if root in mutated and (not unnamed or v.kind == INPUT):
                what = "input" if root is v.node else f"a view of input {root.name}, which"
                v.can_save = False
                v.no_save_reason = (
                    f"{what} {STALE_READ} (the backward would read the new value)"
                    if not unnamed else "graph input of a graph whose input mutations are not described")
            if root.op == "placeholder":
                v.bytes_note = f"alias of input {root.name}" if root is not v.node else "graph input"
            elif root.op == "get_attr":
                v.bytes_note = f"alias of constant {root.name}"
            else:
                rv = root.meta.get("val")
                rv = rv if isinstance(rv, torch.Tensor) else val
                v.bytes_expr = allocated_bytes_expr(rv)
                if root is not v.node:
                    v.bytes_note = f"view of {root.name}"
                    v.root = by_node.get(root)
        if v.kind == FWD and v.can_recompute:
            c = node_cost(v.node)
            if not c.known:
                v.can_recompute = False
                v.no_recompute_reason = "no cost model"
            v.flops_expr, v.moved_expr = c.flops, c.moved
        elif v.kind == FWD:
            # a node that may not be recomputed still has a cost (for the report)
            try:
                c = node_cost(v.node)
                v.flops_expr, v.moved_expr = c.flops, c.moved
            except Exception:  # noqa: BLE001
                pass
    # A training-mode batch norm recomputed in backward reads its running statistics, which the
    # forward has overwritten, without using their values: it may read them as they are then. A
    # vertex of its own per statistic stands for that read (0 B, savable); the statistic's own
    # vertex stays unsavable for everything else.
    stale: dict[torch.fx.Node, Vertex] = {}
    for bn, stat in stale_ok:
        if stat not in stale:
            stale[stat] = Vertex(index=len(vertices), node=stat, kind=INPUT, can_recompute=False,
                                 no_recompute_reason="graph input",
                                 bytes_note="running statistic a training-mode batch norm reads without using it")
            vertices.append(stale[stat])
        bn.inputs.append(stale[stat].index)
    direct_set = set(direct)
    for v in vertices:
        v.required = v.node in direct_set
    for v in vertices:
        v.view_of_savable = v.root is not None and vertices[v.root].can_save
    # A random op inside a torch.utils.checkpoint region may be recomputed: torch then saves
    # the RNG state and replays it. Model that state as an input of the op that can only be
    # saved, so recomputing the op costs its bytes.
    for v in list(vertices):
        if v.kind == FWD and v.can_recompute and _is_random(v.node):
            state = Vertex(index=len(vertices), node=v.node, kind=INPUT, can_recompute=False,
                           no_recompute_reason="RNG state", bytes_expr=sympy.Integer(_rng_state_bytes(v.node)),
                           bytes_note=f"RNG state torch saves to replay {v.node.name}", rng_state_of=v.index)
            vertices.append(state)
            v.inputs.append(state.index)

    # MoE layers: getitem(moe_experts, 1) read only by the matching backward ops.
    layers: list[MoeLayer] = []
    for node in joint_graph.nodes:
        if node.op != "call_function" or not _is_blaze(node, "moe_experts") or not is_fw(node):
            continue
        pre = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        if len(pre) != 1 or pre[0] not in by_node:
            continue
        p = pre[0]
        users = list(p.users)
        if not users or not all(
            _is_blaze(u, "moe_experts_backward") and in_bw(u) and u.args[12] is p
            and sum(1 for a in u.all_input_nodes if a is p) == 1 for u in users
        ):
            continue
        now = _experts_flag(node)
        if any(bool(u.args[15]) != now for u in users):
            continue
        g_flops, g_moved, pre_bytes = experts_gemm1(node)
        layers.append(
            MoeLayer(
                index=len(layers), fwd=node, bwds=users, preact=by_node[p], recompute_now=now,
                preact_bytes_expr=pre_bytes, gemm1_flops_expr=g_flops, gemm1_cost=0.0,
            )
        )
        # The backward reads preact only through this layer's decision: it is not required
        # on its own, and its size is the one it has when saved.
        vp = vertices[by_node[p]]
        vp.required = False
        vp.bytes_expr = pre_bytes
        vp.bytes_note = "moe preact"

    # Evaluation points
    all_nodes = [n for n in joint_graph.nodes]
    shape_env = _shape_env(all_nodes)
    syms: set[sympy.Symbol] = set()
    for v in vertices:
        syms |= v.bytes_expr.free_symbols | v.flops_expr.free_symbols | v.moved_expr.free_symbols
    for layer in layers:
        syms |= layer.preact_bytes_expr.free_symbols | layer.gemm1_flops_expr.free_symbols
    fw_costs = []
    for node in all_nodes:
        if node.op == "call_function" and is_fw(node):
            try:
                c = node_cost(node)
            except Exception:  # noqa: BLE001
                continue
            fw_costs.append(c)
            syms |= c.flops.free_symbols | c.moved.free_symbols
    symbols = sorted(syms, key=str)
    hint = {s: _symbol_hint(shape_env, s) for s in symbols} if shape_env is not None else {}
    points = [Point("size hints", hint)]
    declared = False
    notes: list[str] = []
    if symbols and shape_env is not None:
        lo: dict = {}
        hi: dict = {}
        for s in symbols:
            lower, upper = _symbol_range(shape_env, s)
            lo[s] = max(1, lower) if lower is not None else max(1, min(2, hint[s]))
            if upper is not None and upper >= hint[s]:
                hi[s] = upper
                declared = True
            else:
                hi[s] = None
        points.append(Point("lower bounds", lo))
        if declared:
            points.append(Point("declared max", {s: (hi[s] if hi[s] is not None else hint[s]) for s in symbols}))
        else:
            points.append(Point("large sizes (hints x 1024)", {s: hint[s] * 1024 for s in symbols}))

    bytes_at = [[_eval_int(v.bytes_expr, p.subs) for v in vertices] for p in points]
    layer_bytes_at = [[_eval_int(layer.preact_bytes_expr, p.subs) for layer in layers] for p in points]
    for v in vertices:
        if v.kind == FWD:
            v.cost = seconds(_eval_int(v.flops_expr, hint), _eval_int(v.moved_expr, hint))
    for layer in layers:
        g_flops, g_moved, _ = experts_gemm1(layer.fwd)
        layer.gemm1_cost = seconds(_eval_int(g_flops, hint), _eval_int(g_moved, hint))
    fwd_cost = sum(seconds(_eval_int(c.flops, hint), _eval_int(c.moved, hint)) for c in fw_costs)
    fwd_flops = float(sum(_eval_int(c.flops, hint) for c in fw_costs))
    return Problem(
        vertices=vertices, layers=layers, points=points, bytes_at=bytes_at,
        layer_bytes_at=layer_bytes_at, forward_cost=fwd_cost, forward_flops=fwd_flops,
        symbols=symbols, declared_max=declared, notes=notes, by_node=by_node,
    )


def _experts_flag(node: torch.fx.Node) -> bool:
    if len(node.args) > 13:
        return bool(node.args[13])
    return bool(node.kwargs.get("recompute", False))


def set_experts_flag(layer: MoeLayer, recompute: bool) -> None:
    """Rewrite one MoE layer's forward and backward ops to ``recompute`` (and fix metadata)."""
    fwd = layer.fwd
    if _experts_flag(fwd) == recompute and all(bool(b.args[15]) == recompute for b in layer.bwds):
        return
    args = list(fwd.args)
    kwargs = dict(fwd.kwargs)
    if len(args) > 13:
        args[13] = recompute
    else:
        if len(args) == 12 and "weight_pos" not in kwargs:
            kwargs["weight_pos"] = "output"
        kwargs["recompute"] = recompute
    fwd.args = tuple(args)
    fwd.kwargs = kwargs
    for b in layer.bwds:
        bargs = list(b.args)
        bargs[15] = recompute
        b.args = tuple(bargs)
    # metadata: preact is [0] with recompute, [S, n_in] without
    y, pre = fwd.meta["val"]
    if recompute:
        new_pre = pre.new_empty((0,))
    else:
        from blazec.ops.activations import is_gated

        x_val = fwd.args[0].meta["val"]
        sp = fwd.args[2].meta["val"]
        width = fwd.args[5][0].meta["val"].shape[-2]
        activation = fwd.args[11] if len(fwd.args) > 11 else fwd.kwargs["activation"]
        new_pre = x_val.new_empty((sp.shape[0], 2 * width if is_gated(activation) else width))
    fwd.meta["val"] = (y, new_pre)
    for u in fwd.users:
        if u.target is operator.getitem and u.args[1] == 1:
            u.meta["val"] = new_pre
            if "tensor_meta" in u.meta:
                from torch.fx.passes.shape_prop import _extract_tensor_metadata

                u.meta["tensor_meta"] = _extract_tensor_metadata(new_pre)
    # Inductor lowers a custom op with its inputs constrained to the strides recorded at
    # trace time (meta "eager_input_vals"): those of the backward's preact and flag change too
    for n in (fwd, *layer.bwds):
        if "eager_input_vals" in n.meta:
            n.meta["eager_input_vals"] = torch.fx.node.map_aggregate(
                (n.args, n.kwargs), lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a)
