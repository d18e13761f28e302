"""Memory-budget activation checkpointing: which tensors the forward saves for backward.

``torch.compile(m, backend="blaze", options={"memory_budget": 0.6})`` asks for the plan with
the least estimated recompute time whose saved activations fit in 60% of what the default
partition saves (or ``"2GiB"``: absolute bytes). The solver sees the whole joint graph:

1. :func:`blazec.passes.checkpoint_model.build_problem` turns it into candidates with sympy
   sizes and roofline recompute costs, and one decision per MoE layer (save the experts'
   pre-activations, or recompute GEMM1 in backward);
2. :func:`blazec.passes.checkpoint_solve.solve` finds the plan: a minimum cut when the
   unconstrained optimum already fits, the exact MILP (HiGHS) under a time limit, or the
   Lagrangian min-cut heuristic; it never returns a plan over budget when one fits, and
   returns the minimum-memory plan (with the smallest feasible budget) when none does;
3. the plan is handed to torch's own partitioner, which builds the forward and backward
   graphs exactly as it would for its own choice (CSE, RNG handling, graph extraction,
   Inductor's joint passes all unchanged).

Step 3 works by standing in for ``torch._functorch.partitioners.choose_saved_values_set``
while :func:`blazec.partition.partition_joint` runs ``min_cut_rematerialization_partition``
(:func:`install`). With no ``memory_budget`` the default choice is kept and only reported.

The plan (:class:`CheckpointPlan`) is part of the partition report, so ``blazec dump``
prints it.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

import sympy
import torch
import torch.fx

from blazec.passes.checkpoint_model import (
    FWD,
    STALE_READ,
    Problem,
    build_problem,
    set_experts_flag,
)
from blazec.passes.checkpoint_solve import Plan, SolveResult, evaluate, solve

log = logging.getLogger("blazec")

_lock = threading.RLock()
_captures = threading.local()


# ---------------------------------------------------------------------------------------
# The report


@dataclass
class PlanTensor:
    name: str
    shape: list[str]
    dtype: str
    bytes: int
    bytes_expr: str
    note: str = ""


@dataclass
class PlanRecompute:
    name: str
    op: str
    flops: int
    cost_us: float


@dataclass
class PlanMoe:
    name: str
    choice: str  # "save_preact" or "recompute_gemm1"
    was: str
    preact_bytes: int
    preact_bytes_expr: str
    gemm1_flops: int
    gemm1_cost_us: float


@dataclass
class CheckpointPlan:
    """What the checkpoint solver decided for one joint graph (JSON-friendly)."""

    solver: str  # "ilp", "heuristic", "min-cut", "min-memory fallback", "default (min-cut partition)"
    status: str  # "optimal", "time limit", "feasible", "infeasible", "default"
    gap: float | None = None
    lower_bound_us: float | None = None
    solve_seconds: float = 0.0
    budget_spec: str | None = None
    budget_bytes: int | None = None  # at the size hints
    saved_bytes: int = 0  # at the size hints
    saved_bytes_expr: str = "0"
    default_bytes: int = 0
    default_bytes_expr: str = "0"
    default_recompute_us: float = 0.0
    min_feasible_bytes: int | None = None
    fits: bool = True
    recompute_us: float = 0.0
    recompute_flops: int = 0
    forward_us: float = 0.0
    saved: list[PlanTensor] = field(default_factory=list)
    recomputed: list[PlanRecompute] = field(default_factory=list)
    free_recomputed: int = 0  # views, getitems, shape ops recomputed at no cost
    moe: list[PlanMoe] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # label, saved, budget, default
    message: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        """Estimated recompute time as a fraction of the forward's estimated time."""
        return self.recompute_us / self.forward_us if self.forward_us > 0 else 0.0

    def lines(self) -> list[str]:
        extra = [self.status]
        if self.budget_spec is not None and self.status != "infeasible":
            if self.gap is not None:
                extra.append(f"gap {100 * self.gap:.3g}%")
            else:
                extra.append("gap unknown")
        if self.budget_spec is not None:
            extra.append(f"{self.solve_seconds:.2f} s")
        out = [f"checkpoint plan: solver {self.solver} ({', '.join(extra)})"]
        if self.budget_spec is None and self.status in ("invalid", "error"):
            out.append("  budget: set but NOT ENFORCED: PyTorch's partition, unchanged")
        elif self.budget_spec is None:
            out.append("  budget: none (memory_budget not set): PyTorch's partition, unchanged")
        else:
            out.append(f"  budget: {self.budget_spec} = {self.budget_bytes:,d} B at the size hints")
        if self.message:
            out.append(f"  {self.message}")
        bytes_saved = [t for t in self.saved if t.bytes > 0 or t.bytes_expr != "0"]
        free = len(self.saved) - len(bytes_saved)
        out.append(
            f"  saved for backward: {self.saved_bytes:,d} B = {self.saved_bytes_expr} in {len(bytes_saved)} tensor(s)"
            + (f" (+{free} at 0 B: inputs, views of inputs or of saved storage, sizes)" if free else "")
            + (f"; budget {self.budget_bytes:,d} B: {'fits' if self.fits else 'OVER BUDGET'}" if self.budget_bytes is not None else "")
        )
        w = max([len(t.name) for t in bytes_saved] + [4])
        for t in bytes_saved:
            note = f"  {t.note}" if t.note else ""
            out.append(f"    {t.name:<{w}}  {t.dtype:<8} [{', '.join(t.shape)}]  {t.bytes:,d} B = {t.bytes_expr}{note}")
        recomputed = {r.name for r in self.recomputed}  # a layer recomputed whole (its checkpoint region)
        n_gemm1 = sum(m.choice == "recompute_gemm1" and m.name not in recomputed for m in self.moe)
        out.append(
            f"  recomputed in backward: {len(self.recomputed)} node(s)"
            + (f" (+{self.free_recomputed} free: views, getitems, sizes)" if self.free_recomputed else "")
            + (f" and GEMM1 of {n_gemm1} MoE layer(s)" if n_gemm1 else "")
            + f", estimated {fmt_time(self.recompute_us)}, {self.recompute_flops:,d} FLOP"
            f" = {100 * self.overhead:.1f}% of the forward's estimated {fmt_time(self.forward_us)}"
        )
        w = max([len(r.name) for r in self.recomputed] + [4])
        for r in self.recomputed:
            out.append(f"    {r.name:<{w}}  {r.op:<28} {r.flops:>14,d} FLOP  {fmt_time(r.cost_us)}")
        for m in self.moe:
            changed = "" if m.choice == m.was else f" (was {m.was})"
            if m.name in recomputed:  # a checkpoint region's layer: its forward runs again in backward
                what = "the whole op is recomputed in backward, so its preact is made there; nothing of it is saved"
            elif m.choice == "save_preact":
                what = f"saves preact, {m.preact_bytes:,d} B = {m.preact_bytes_expr}"
            else:
                what = (f"drops preact ({m.preact_bytes:,d} B = {m.preact_bytes_expr}); GEMM1 again in backward: "
                        f"{m.gemm1_flops:,d} FLOP, {fmt_time(m.gemm1_cost_us)}")
            out.append(f"  MoE layer {m.name}: {m.choice}{changed}: {what}")
        out.append(
            f"  default partition: saves {self.default_bytes:,d} B = {self.default_bytes_expr}, "
            f"recomputes {fmt_time(self.default_recompute_us)}"
            + (f"; smallest feasible budget {self.min_feasible_bytes:,d} B" if self.min_feasible_bytes is not None else "")
        )
        for p in self.points[1:]:
            b = p.get("budget")
            out.append(
                f"  at {p['label']}: saves {p['saved']:,d} B"
                + (f" (budget {b:,d} B)" if b is not None else "")
                + f", default {p['default']:,d} B"
            )
        for line in self.log:
            out.append(f"  solver: {line}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["overhead"] = self.overhead
        return d


def _us(seconds: float) -> float:
    return seconds * 1e6


def fmt_time(us: float) -> str:
    """A duration given in microseconds, in a readable unit."""
    if us == 0:
        return "0 s"
    if us < 1:
        return f"{us * 1e3:.3g} ns"
    if us < 1e3:
        return f"{us:.3g} us"
    if us < 1e6:
        return f"{us / 1e3:.3g} ms"
    return f"{us / 1e6:.3g} s"


def _expr_str(e: sympy.Expr) -> str:
    return str(sympy.expand(e))


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    return str(getattr(t, "__name__", t))


def _shape_strs(node: torch.fx.Node) -> tuple[list[str], str]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [str(sympy.sympify(s.node.expr) if isinstance(s, torch.SymInt) else s) for s in val.shape], str(val.dtype).replace("torch.", "")
    return [], type(val).__name__


def describe(problem: Problem, plan: Plan, default: Plan, *, solver: str, status: str,
             budget: list[int | None] | None, budget_spec: str | None,
             result: SolveResult | None = None) -> CheckpointPlan:
    verts = problem.vertices
    saved: list[PlanTensor] = []
    counted: dict[int, str] = {}
    for i in sorted(plan.saved):
        v = verts[i]
        shape, dtype = _shape_strs(v.node)
        key = v.root if v.root is not None else i
        if key in counted:
            saved.append(PlanTensor(v.name, shape, dtype, 0, "0", f"{v.bytes_note}, storage counted with {counted[key]}"))
            continue
        counted[key] = v.name
        saved.append(PlanTensor(v.name, shape, dtype, problem.bytes_at[0][i], _expr_str(v.bytes_expr), v.bytes_note))
    saved_expr = storage_bytes_expr(problem, plan.saved)
    default_expr = storage_bytes_expr(problem, default.saved)
    recomputed: list[PlanRecompute] = []
    free = 0
    flops_total = 0
    for i in plan.recomputed:
        v = verts[i]
        if v.kind != FWD or v.cost <= 0:
            free += 1
            continue
        fl = problem.eval_expr(v.flops_expr)
        flops_total += fl
        recomputed.append(PlanRecompute(v.name, _op_name(v.node), fl, _us(v.cost)))
    moe: list[PlanMoe] = []
    for layer in problem.layers:
        choice = "recompute_gemm1" if layer.index in plan.z else "save_preact"
        was = "recompute_gemm1" if layer.recompute_now else "save_preact"
        gf = problem.eval_expr(layer.gemm1_flops_expr)
        if layer.index in plan.z:
            flops_total += gf
        moe.append(PlanMoe(layer.name, choice, was, problem.layer_bytes_at[0][layer.index],
                           _expr_str(layer.preact_bytes_expr), gf, _us(layer.gemm1_cost)))
    points = []
    for j, p in enumerate(problem.points):
        points.append({
            "label": p.describe(),
            "saved": plan.bytes_at[j],
            "budget": None if budget is None else budget[j],
            "default": default.bytes_at[j],
        })
    fits = budget is None or plan.fits(budget)
    cp = CheckpointPlan(
        solver=solver,
        status=status,
        budget_spec=budget_spec,
        budget_bytes=None if budget is None else budget[0],
        saved_bytes=plan.bytes_at[0],
        saved_bytes_expr=_expr_str(saved_expr),
        default_bytes=default.bytes_at[0],
        default_bytes_expr=_expr_str(default_expr),
        default_recompute_us=_us(default.cost),
        fits=fits,
        recompute_us=_us(plan.cost),
        recompute_flops=flops_total,
        forward_us=_us(problem.forward_cost),
        saved=saved,
        recomputed=recomputed,
        free_recomputed=free,
        moe=moe,
        points=points,
    )
    if result is not None:
        cp.gap = result.gap
        cp.lower_bound_us = None if result.lower_bound is None else _us(result.lower_bound)
        cp.solve_seconds = result.seconds
        cp.log = list(result.log)
        if result.min_memory_bytes:
            cp.min_feasible_bytes = result.min_memory_bytes[0]
    if plan.violations:
        cp.log += [f"violation: {v}" for v in plan.violations]
    cp.log += problem.notes
    return cp


# ---------------------------------------------------------------------------------------
# Budgets


def storage_bytes_expr(problem: Problem, saved) -> sympy.Expr:
    """Saved bytes as a formula in the symbolic sizes, each storage counted once."""
    keys = {}
    for i in sorted(saved):
        v = problem.vertices[i]
        keys.setdefault(v.root if v.root is not None else i, v.bytes_expr)
    return sympy.expand(sum(keys.values(), sympy.Integer(0)))


def resolve_budget(problem: Problem, default: Plan, memory_budget: int | float) -> tuple[list[int | None], str]:
    """Bytes allowed at each evaluation point, and the budget in words.

    A fraction applies at every point (the plan keeps the same fraction of the default's
    bytes across sizes); absolute bytes apply at the size hints and at declared maxima.
    """
    npts = len(problem.points)
    if isinstance(memory_budget, float):
        budget = [int(memory_budget * default.bytes_at[j]) for j in range(npts)]
        return budget, f"{100 * memory_budget:.4g}% of the default partition's {default.bytes_at[0]:,d} B"
    budget: list[int | None] = [int(memory_budget)] + [None] * (npts - 1)
    for j, p in enumerate(problem.points):
        if p.label == "declared max":
            budget[j] = int(memory_budget)
    words = f"{int(memory_budget):,d} B ({_human(int(memory_budget))})"
    if any(p.label.startswith("large sizes") for p in problem.points):  # dynamic, no declared maximum
        words += (", at the size hints only: the graph's sizes are dynamic with no declared maximum "
                  "(torch._dynamo.mark_dynamic(x, dim, max=...)), and larger sizes save more")
        log.warning("blaze memory_budget: an absolute budget of %s holds at this graph's size hints only: its sizes "
                    "are dynamic with no declared maximum (declare one with torch._dynamo.mark_dynamic(x, dim, "
                    "max=...), or give the budget as a fraction)", _human(int(memory_budget)))
    return budget, words


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------
# Standing in for torch's choose_saved_values_set


@dataclass
class Captured:
    """One joint graph as the partitioner saw it (for benchmarks and tests)."""

    joint_graph: torch.fx.Graph
    node_info: Any
    problem: Problem
    default_saved: list[torch.fx.Node]
    default: Plan
    choose: Any  # torch's choose_saved_values_set

    def torch_plan(self, activation_memory_budget: float) -> Plan:
        """Torch's own budgeted choice (``activation_memory_budget``) in this problem's terms."""
        import torch._functorch.config as fconfig

        with fconfig.patch(activation_memory_budget=activation_memory_budget):
            nodes = self.choose(self.joint_graph, self.node_info, memory_budget=activation_memory_budget)
        return plan_of_nodes(self.problem, nodes)


def plan_of_nodes(problem: Problem, nodes: list[torch.fx.Node]) -> Plan:
    """Torch's choice (a list of saved nodes) in the problem's terms."""
    saved = {problem.by_node[n] for n in nodes if n in problem.by_node}
    # torch saves the RNG state of the random ops it recomputes by itself
    saved |= {v.index for v in problem.vertices if v.rng_state_of is not None}
    z = {layer.index for layer in problem.layers if layer.recompute_now}
    return evaluate(problem, saved, z)


@contextlib.contextmanager
def capture() -> Iterator[list[Captured]]:
    """Record every joint graph partitioned inside the block (with ``memory_budget`` unset,
    the graphs are left as they came, so torch's own choices can be replayed on them)."""
    if not hasattr(_captures, "stack"):
        _captures.stack = []
    out: list[Captured] = []
    _captures.stack.append(out)
    try:
        yield out
    finally:
        _captures.stack.pop()


class Session:
    """One partition: holds the config, and the plan once chosen."""

    def __init__(self, config: Any):
        self.config = config
        self.plan: CheckpointPlan | None = None
        self.error: str | None = None

    def choose(self, original, args: tuple, kwargs: dict) -> list[torch.fx.Node]:
        budget_opt = getattr(self.config, "memory_budget", None)
        joint_graph = args[0] if args else kwargs["joint_graph"]
        node_info = args[1] if len(args) > 1 else kwargs["node_info"]
        if budget_opt is None:
            default_saved = original(*args, **kwargs)
        else:
            # the reference is the default min-cut, whatever torch's own budget says
            default_saved = original(joint_graph, node_info)
        try:
            problem = build_problem(joint_graph, node_info)
            default = plan_of_nodes(problem, default_saved)
        except Exception as e:  # noqa: BLE001 - never break a compile over the report
            self.error = f"checkpoint solver failed on this graph: {type(e).__name__}: {e}"
            log.warning("blaze: %s; using the default partition", self.error)
            return default_saved
        for rec in getattr(_captures, "stack", []):
            rec.append(Captured(joint_graph, node_info, problem, list(default_saved), default, original))
        # a violation where a saved value would be read after the forward wrote it: wrong gradients
        stale = [v for v in default.violations if STALE_READ in v]
        if budget_opt is None and stale:
            # torch's partition saves an input the forward then writes in place and recomputes
            # from it: its backward would read the new value (wrong gradients; torch's own
            # backends do the same). The solver's plans never do; ask it for one at the
            # default's bytes.
            why = (f"the default partition is not used: {stale[0]}; blazec's solver chose the plan "
                   "at the default partition's bytes instead")
            log.warning("blaze checkpoint: %s", why)
            try:
                saved = self._solve(problem, default, default_saved, 1.0)
            except Exception as e:  # noqa: BLE001
                log.warning("blaze checkpoint: the solver failed too (%s: %s); the default partition is used",
                            type(e).__name__, e)
            else:
                if self.plan is not None and self.plan.status != "invalid":
                    self.plan.message = "; ".join(m for m in (why, self.plan.message) if m)
                    return saved
        if budget_opt is None:
            torch_budget = args[2] if len(args) > 2 else kwargs.get("memory_budget", 1)
            label = "default (min-cut partition)" if torch_budget == 1 else (
                f"torch (activation_memory_budget={torch_budget})")
            self.plan = describe(problem, default, default, solver=label,
                                 status="default", budget=None, budget_spec=None)
            defaults = {f.name: f.default for f in fields(self.config)}
            unused = [f"{k}={getattr(self.config, k)!r}" for k in ("checkpoint_solver", "checkpoint_time_limit")
                      if getattr(self.config, k) != defaults[k]]
            if unused:  # set, and read only to meet a budget: said, not silently dropped
                self.plan.message = f"{' and '.join(unused)} not used: they apply to a memory_budget, and none is set"
            return default_saved
        try:
            return self._solve(problem, default, default_saved, budget_opt)
        except Exception as e:  # noqa: BLE001
            self.error = f"checkpoint solver failed: {type(e).__name__}: {e}"
            log.warning("blaze: %s; using the default partition (the budget is NOT enforced)", self.error)
            self.plan = describe(problem, default, default, solver="default (solver error)", status="error",
                                 budget=None, budget_spec=None)
            self.plan.message = self.error
            return default_saved

    def _solve(self, problem: Problem, default: Plan, default_saved: list[torch.fx.Node], budget_opt) -> list[torch.fx.Node]:
        budget, spec = resolve_budget(problem, default, budget_opt)
        res = solve(problem, budget, solver=self.config.checkpoint_solver,
                    time_limit=self.config.checkpoint_time_limit)
        if res.status == "invalid":
            # no plan at all in the model (a value the backward needs can be neither saved
            # nor recomputed): leave the partition to torch
            self.error = f"no valid checkpoint plan ({'; '.join(res.log)}); the default partition is used"
            log.warning("blaze memory_budget: %s", self.error)
            self.plan = describe(problem, default, default, solver="default (no valid plan)", status="invalid",
                                 budget=None, budget_spec=None)
            self.plan.message = self.error
            return default_saved
        plan = res.plan
        cp = describe(problem, plan, default, solver=res.solver, status=res.status, budget=budget,
                      budget_spec=spec, result=res)
        if res.status == "infeasible":
            smallest = res.min_memory_bytes[0]
            frac = f" ({100 * smallest / default.bytes_at[0]:.1f}% of the default partition)" if default.bytes_at[0] else ""
            if smallest > budget[0]:
                cp.message = (
                    f"NO PLAN FITS the budget of {budget[0]:,d} B: the smallest feasible budget is "
                    f"{smallest:,d} B{frac}; using the minimum-memory plan"
                )
            else:
                over = [p["label"] for p in cp.points if p["budget"] is not None and p["saved"] > p["budget"]]
                cp.message = (
                    f"NO PLAN FITS the budget at every evaluation point ({', '.join(over) or 'other sizes'}): "
                    f"the smallest plan at the size hints saves {smallest:,d} B{frac}; using the minimum-memory plan"
                )
            log.warning("blaze memory_budget: %s", cp.message)
        self.plan = cp
        log.info(
            "blaze checkpoint: solver %s (%s%s): saves %s B of a %s B budget, recomputes %s (%.1f%% of the forward)",
            cp.solver, cp.status, "" if cp.gap is None else f", gap {100 * cp.gap:.3g}%",
            f"{cp.saved_bytes:,d}", f"{cp.budget_bytes:,d}", fmt_time(cp.recompute_us), 100 * cp.overhead,
        )
        # Apply: flip MoE layers, then hand torch the saved nodes in graph order.
        for layer in problem.layers:
            set_experts_flag(layer, layer.index in plan.z)
        nodes = [problem.vertices[i].node for i in plan.saved if problem.vertices[i].rng_state_of is None]
        nodes += [problem.vertices[layer.preact].node for layer in problem.layers
                  if layer.index in plan.z and problem.vertices[layer.preact].node not in nodes]
        order = {n: k for k, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
        return sorted(set(nodes), key=lambda n: order[n])


@contextlib.contextmanager
def install(config: Any) -> Iterator[Session]:
    """Within the block, torch's partitioner asks this module which values to save."""
    session = Session(config)
    try:
        import torch._functorch.partitioners as partitioners
    except ImportError:  # pragma: no cover
        partitioners = None
    original = getattr(partitioners, "choose_saved_values_set", None)
    if original is None:
        session.error = (
            "this torch has no torch._functorch.partitioners.choose_saved_values_set; "
            "the checkpoint solver is unavailable and the default partition is used"
        )
        if getattr(config, "memory_budget", None) is not None:
            log.warning("blaze memory_budget: %s", session.error)
        yield session
        return

    def choose_saved_values_set(*args, **kwargs):
        return session.choose(original, args, kwargs)

    with _lock:
        partitioners.choose_saved_values_set = choose_saved_values_set
        try:
            yield session
        finally:
            partitioners.choose_saved_values_set = original
