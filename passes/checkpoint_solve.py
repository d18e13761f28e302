"""Solvers for the checkpoint problem of :mod:`checkpoint_model`.

The problem. For every vertex ``v`` choose ``r_v`` (computed again in backward) and ``a_v``
(its value is available in backward); ``s_v = a_v and not r_v`` means saved. Constraints:

- a recomputed vertex needs its inputs available: ``r_v <= a_u`` for each input ``u``;
- what the backward reads is available: ``a_v = 1`` for required vertices;
- each MoE layer either has its pre-activations available or recomputes GEMM1:
  ``a_preact + z_layer >= 1``;
- vertices that may not be recomputed (inputs, random ops, collectives, ...) have
  ``r_v = 0``; those that may not be saved have ``s_v = 0``;
- the budget: ``sum_v bytes_v(p) * s_v <= budget(p)`` at every evaluation point ``p``.

Minimise ``sum_v cost_v * r_v + sum_layer gemm1_layer * z_layer`` (then, as a tie-break,
saved bytes). Without the budget this is a closure problem, which is a minimum cut (the
structure torch's partitioner uses, with recompute costs on the source edges). With it:

- :func:`solve_ilp`: the exact optimum with scipy's HiGHS MILP, under a time limit;
- :func:`solve_heuristic`: Lagrangian relaxation of the budget, each multiplier solved
  exactly as a networkx minimum cut, bisection on the multiplier, then a greedy fill of the
  remaining budget. With one evaluation point the Lagrangian dual gives a lower bound, so
  the gap is known.

:func:`evaluate` is the ground truth all of them report through: given a saved set and the
MoE choices, it walks back from what the backward reads, recomputing every value that is
not saved, exactly as torch's graph extraction will.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field


from blazec.passes.checkpoint_model import FWD, INPUT, Problem

# Relative weight of saved bytes against recompute cost in the objective's tie-break: the
# recompute cost of a returned plan is within TIE_BREAK * (total candidate cost) of optimal.
TIE_BREAK = 1e-7
# "auto" uses the exact solver up to this many vertices.
EXACT_MAX_VERTICES = 6000


@dataclass
class Plan:
    """A saved set and MoE choices, with what they imply (from :func:`evaluate`)."""

    saved: frozenset[int]  # vertices the forward saves (only those the backward reads)
    z: frozenset[int]  # MoE layers that recompute GEMM1 instead of saving preact
    recomputed: list[int]  # vertices computed in backward (forward order)
    cost: float  # seconds of recompute: recomputed forward vertices + GEMM1 of layers in z
    bytes_at: list[int]  # saved bytes at each evaluation point
    violations: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.violations

    def fits(self, budget: list[int | None]) -> bool:
        return all(b is None or x <= b for x, b in zip(self.bytes_at, budget))


def evaluate(problem: Problem, saved: set[int] | frozenset[int], z: set[int] | frozenset[int]) -> Plan:
    """What saving ``saved`` (and recomputing GEMM1 of the layers in ``z``) implies."""
    verts = problem.vertices
    need = [v.index for v in verts if v.required]
    need += [layer.preact for layer in problem.layers if layer.index not in z]
    visited: set[int] = set()
    used: set[int] = set()
    recomputed: list[int] = []
    violations: list[str] = []
    cost = 0.0
    stack = list(need)
    while stack:
        i = stack.pop()
        if i in visited:
            continue
        visited.add(i)
        v = verts[i]
        if i in saved:
            if v.can_save:
                used.add(i)
                continue
            violations.append(f"{v.name} cannot be saved ({v.no_save_reason})")
        if not v.can_recompute:
            violations.append(f"{v.name} is needed in backward but is not saved and cannot be recomputed ({v.no_recompute_reason})")
            if v.kind == INPUT:
                continue
            # walk on as if it were recomputed (torch's own plans do recompute ops this model
            # has no cost for), so that a stale input read behind it is reported too
        recomputed.append(i)
        if v.kind == FWD:
            cost += v.cost
        stack.extend(v.inputs)
    cost += sum(problem.layers[k].gemm1_cost for k in z)
    # one storage per root: a view and its base (or two views of it) are kept once
    storages = {verts[i].root if verts[i].root is not None else i: i for i in used}
    bytes_at = [sum(row[i] for i in storages.values()) for row in problem.bytes_at]
    recomputed.sort()
    return Plan(frozenset(used), frozenset(z), recomputed, cost, bytes_at, violations)


# ---------------------------------------------------------------------------------------
# Minimum cut


class NoValidPlan(Exception):
    """No plan at all (whatever the budget): a value the backward reads can be neither
    saved nor recomputed. Torch's partitioner fails on such graphs too."""


def min_cut(problem: Problem, cost_weight: float, mem_weight: list[float], forbid_save: set[int] | None = None) -> Plan:
    """Exactly minimise ``cost_weight * recompute cost + sum_v mem_weight[v] * saved_v``.

    The network is torch's (``v_in -> v_out`` is "save v", ``u_out -> v_in`` a data edge,
    ``v_out -> sink`` "the backward reads v"), plus ``source -> v_in`` with v's recompute
    cost and ``preact_out -> sink`` with the layer's GEMM1 cost (cut: recompute GEMM1).
    """
    import networkx as nx

    verts = problem.vertices
    forbid_save = forbid_save or set()
    caps: list[tuple[object, object, float]] = []
    inf_edges: list[tuple[object, object]] = []
    for v in verts:
        i = v.index
        vin, vout = ("i", i), ("o", i)
        if not v.can_recompute:
            inf_edges.append(("s", vin))
        elif v.kind == FWD and v.cost > 0:
            caps.append(("s", vin, cost_weight * v.cost))
        if v.solver_save and i not in forbid_save:
            caps.append((vin, vout, mem_weight[i]))
        else:
            inf_edges.append((vin, vout))
        for u in v.inputs:
            inf_edges.append((("o", u), vin))
        if v.required:
            inf_edges.append((vout, "t"))
    for layer in problem.layers:
        caps.append((("o", layer.preact), "t", cost_weight * layer.gemm1_cost))
    finite = [c for _, _, c in caps if c > 0 and math.isfinite(c)]
    scale = 1e12 / max(finite) if finite else 1.0
    g = nx.DiGraph()
    g.add_node("s")
    g.add_node("t")
    for a, b in inf_edges:
        g.add_edge(a, b)  # no capacity attribute: infinite
    for a, b, c in caps:
        if g.has_edge(a, b) and "capacity" not in g[a][b]:
            continue  # already infinite
        cap = int(round(c * scale)) if math.isfinite(c) else None
        if cap is None:
            g.add_edge(a, b)
        elif g.has_edge(a, b):
            g[a][b]["capacity"] += cap
        else:
            g.add_edge(a, b, capacity=cap)
    try:
        _value, (source_side, _sink_side) = nx.minimum_cut(g, "s", "t")
    except nx.NetworkXUnbounded:
        # some value the backward reads can be neither saved nor recomputed
        plan = evaluate(problem, {v.index for v in verts if v.can_save}, set())
        raise NoValidPlan("; ".join(plan.violations) or "no valid plan") from None
    saved = {
        v.index for v in verts
        if ("i", v.index) in source_side and ("o", v.index) not in source_side
    }
    z = {layer.index for layer in problem.layers if ("o", layer.preact) in source_side}
    return evaluate(problem, saved, z)


def _mem_scale(problem: Problem) -> float:
    total = sum(problem.bytes_at[0]) + sum(problem.layer_bytes_at[0]) if problem.points else 0
    return float(max(total, 1))


def _cost_scale(problem: Problem) -> float:
    total = sum(v.cost for v in problem.vertices if v.kind == FWD) + sum(layer.gemm1_cost for layer in problem.layers)
    return max(total, 1e-30)


def min_memory(problem: Problem) -> Plan:
    """The plan with the fewest saved bytes (at the hints), and the cheapest among those."""
    cs, ms = _cost_scale(problem), _mem_scale(problem)
    return min_cut(problem, TIE_BREAK / cs, [b / ms for b in problem.bytes_at[0]])


def min_cost(problem: Problem) -> Plan:
    """The cheapest plan (no budget), and the smallest among those."""
    cs, ms = _cost_scale(problem), _mem_scale(problem)
    return min_cut(problem, 1.0 / cs, [TIE_BREAK * b / ms for b in problem.bytes_at[0]])


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class SolveResult:
    plan: Plan
    solver: str  # "ilp", "heuristic", "min-cut", "min-memory fallback"
    status: str  # "optimal", "time limit", "feasible", "infeasible"
    gap: float | None  # relative optimality gap when known
    lower_bound: float | None  # seconds
    seconds: float  # wall time of the solve
    log: list[str] = field(default_factory=list)
    min_memory_bytes: list[int] = field(default_factory=list)


def _budget_rows(problem: Problem, budget: list[int | None]) -> list[tuple[int, int]]:
    return [(j, b) for j, b in enumerate(budget) if b is not None]


def solve(problem: Problem, budget: list[int | None], *, solver: str = "auto", time_limit: float = 5.0) -> SolveResult:
    """The cheapest plan within ``budget`` (bytes per evaluation point; None: no limit)."""
    t0 = time.perf_counter()
    log: list[str] = []
    try:
        pm = min_memory(problem)
    except NoValidPlan as e:
        plan = evaluate(problem, {v.index for v in problem.vertices if v.can_save}, set())
        return SolveResult(plan, "none", "invalid", None, None, time.perf_counter() - t0, [str(e)])
    if budget[0] is not None and pm.bytes_at[0] > budget[0]:
        return _infeasible(pm, t0, log)
    p0 = min_cost(problem)
    if p0.fits(budget) and p0.feasible:
        return SolveResult(p0, "min-cut", "optimal", 0.0, p0.cost, time.perf_counter() - t0,
                           ["the unconstrained optimum (one minimum cut) fits the budget"], pm.bytes_at)
    best: SolveResult | None = None
    if solver in ("auto", "ilp") and (solver == "ilp" or problem.n <= EXACT_MAX_VERTICES):
        try:
            res = solve_ilp(problem, budget, time_limit=time_limit)
        except ImportError as e:  # scipy is optional: the heuristic still runs
            res = SolveResult(None, "ilp", "unavailable", None, None, 0.0,  # type: ignore[arg-type]
                              [f"exact solver unavailable ({e}); install scipy for exact plans"])
        log += res.log
        if res.status == "infeasible":  # proven: no plan fits at every evaluation point
            return _infeasible(pm, t0, log)
        if res.plan is not None and res.plan.fits(budget) and res.plan.feasible:
            best = res
            if res.status == "optimal":
                best.seconds = time.perf_counter() - t0
                best.min_memory_bytes = pm.bytes_at
                return best
    elif solver == "auto":
        log.append(f"{problem.n} vertices > {EXACT_MAX_VERTICES}: skipping the exact solver")
    heur = solve_heuristic(problem, budget, start=[pm, p0], time_limit=max(1.0, time_limit))
    log += heur.log
    if best is None and heur.status == "infeasible":
        # fits at the hints but not at another evaluation point
        return _infeasible(pm, t0, log)
    if best is None or heur.plan.cost < best.plan.cost:
        if best is not None and best.lower_bound is not None:
            lb = max(best.lower_bound, heur.lower_bound or 0.0)
            heur.lower_bound = lb
            heur.gap = _gap(heur.plan.cost, lb)
        best = heur
    elif heur.lower_bound is not None and best.lower_bound is not None and heur.lower_bound > best.lower_bound:
        best.lower_bound = heur.lower_bound
        best.gap = _gap(best.plan.cost, best.lower_bound)
    best.seconds = time.perf_counter() - t0
    best.min_memory_bytes = pm.bytes_at
    best.log = log
    return best


def _infeasible(pm: Plan, t0: float, log: list[str]) -> SolveResult:
    return SolveResult(pm, "min-memory fallback", "infeasible", None, None, time.perf_counter() - t0,
                       log + ["no plan fits the budget; using the minimum-memory plan"], pm.bytes_at)


def _gap(cost: float, lb: float | None) -> float | None:
    if lb is None:
        return None
    if cost <= 0:
        return 0.0
    return max(0.0, (cost - lb) / cost)


# ---------------------------------------------------------------------------------------
# Exact: MILP


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS writes some diagnostics straight to file descriptor 1; keep them out of the
    user's output (its results are reported through the plan)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_ilp(problem: Problem, budget: list[int | None], *, time_limit: float = 5.0) -> SolveResult:
    """The exact optimum with HiGHS (scipy.optimize.milp), stopped after ``time_limit``."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    verts = problem.vertices
    n, L = len(verts), len(problem.layers)
    # Views of one storage that may each be saved (views of a base that cannot be saved: with a
    # savable base, only the base is a candidate) keep that storage once, as ``evaluate``
    # counts it: one storage variable K per such group, and the budget counts K, not each view.
    groups: dict[int, list[int]] = {}
    for v in verts:
        if v.solver_save:
            groups.setdefault(v.root if v.root is not None else v.index, []).append(v.index)
    shared = [members for members in groups.values() if len(members) > 1]
    R, A, S, Z, K = 0, n, 2 * n, 3 * n, 3 * n + L
    nv = 3 * n + L + len(shared)
    cs, ms = _cost_scale(problem), _mem_scale(problem)
    c = np.zeros(nv)
    lb = np.zeros(nv)
    ub = np.ones(nv)
    integrality = np.zeros(nv)
    integrality[R:S] = 1
    for v in verts:
        i = v.index
        if v.kind == FWD:
            c[R + i] = v.cost / cs
        c[S + i] = TIE_BREAK * problem.bytes_at[0][i] / ms
        if not v.can_recompute:
            ub[R + i] = 0
        if v.required:
            lb[A + i] = 1
        if not v.solver_save:
            ub[S + i] = 0
    for layer in problem.layers:
        c[Z + layer.index] = layer.gemm1_cost / cs
    for g, members in enumerate(shared):
        c[K + g] = TIE_BREAK * max(problem.bytes_at[0][i] for i in members) / ms
    in_group = {i: g for g, members in enumerate(shared) for i in members}
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    hi: list[float] = []
    lo: list[float] = []
    r = 0

    def row(entries, upper, lower=-np.inf):
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        hi.append(upper)
        lo.append(lower)
        r += 1

    for v in verts:
        i = v.index
        row([(A + i, 1.0), (R + i, -1.0), (S + i, -1.0)], 0.0)  # a <= r + s
        for u in v.inputs:
            row([(R + i, 1.0), (A + u, -1.0)], 0.0)  # r_v <= a_u
    for layer in problem.layers:
        row([(A + layer.preact, -1.0), (Z + layer.index, -1.0)], -1.0)  # a_p + z >= 1
    for i, g in in_group.items():
        row([(S + i, 1.0), (K + g, -1.0)], 0.0)  # s_view <= k_storage
    for j, b in _budget_rows(problem, budget):
        if b <= 0:
            for i, by in enumerate(problem.bytes_at[j]):
                if by > 0:
                    ub[S + i] = 0
            continue
        entries = [(S + i, by / b) for i, by in enumerate(problem.bytes_at[j]) if by > 0 and i not in in_group]
        entries += [(K + g, max(problem.bytes_at[j][i] for i in members) / b) for g, members in enumerate(shared)
                    if max(problem.bytes_at[j][i] for i in members) > 0]
        row(entries, 1.0)
    A_mat = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    with _quiet_stdout():
        res = milp(
            c,
            constraints=[LinearConstraint(A_mat, np.array(lo), np.array(hi))],
            integrality=integrality,
            bounds=Bounds(lb, ub),
            options={"time_limit": float(time_limit), "mip_rel_gap": 1e-9, "presolve": True},
        )
    elapsed = time.perf_counter() - t0
    log = [f"ilp: {n} vertices, {L} MoE layer(s), {r} rows; HiGHS status {res.status} ({res.message.strip()}) in {elapsed:.2f}s"]
    if res.x is None:
        status = "infeasible" if res.status == 2 else "time limit"
        return SolveResult(None, "ilp", status, None, None, elapsed, log)  # type: ignore[arg-type]
    x = res.x
    saved = {i for i in range(n) if x[A + i] > 0.5 and x[R + i] < 0.5}
    z = {layer.index for layer in problem.layers if x[A + layer.preact] < 0.5}
    plan = evaluate(problem, saved, z)
    dual = getattr(res, "mip_dual_bound", None)
    lower = None if dual is None or not math.isfinite(dual) else float(dual) * cs
    if res.status == 0:
        return SolveResult(plan, "ilp", "optimal", 0.0, plan.cost, elapsed, log)
    gap = _gap(plan.cost, lower)
    return SolveResult(plan, "ilp", "time limit", gap, lower, elapsed, log)


# ---------------------------------------------------------------------------------------
# Heuristic: Lagrangian min-cut + greedy fill


def solve_heuristic(problem: Problem, budget: list[int | None], *, start: list[Plan] | None = None,
                    time_limit: float = 5.0, iters: int = 40) -> SolveResult:
    """Lagrangian relaxation of the budget solved by min-cuts, then a greedy fill."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    cs = _cost_scale(problem)
    rows = _budget_rows(problem, budget)
    forbid: set[int] = set()
    weights = [0.0] * problem.n
    for j, b in rows:
        for i, by in enumerate(problem.bytes_at[j]):
            if by <= 0:
                continue
            if b <= 0:
                forbid.add(i)
            else:
                weights[i] = max(weights[i], by / b)  # surrogate: sum of maxima <= 1
    log: list[str] = []
    candidates = [p for p in (start or []) if p.fits(budget) and p.feasible]
    single = len([1 for j, b in rows if b > 0]) == 1
    lower: float | None = None

    def solve_at(lam: float) -> Plan | None:
        try:
            return min_cut(problem, 1.0 / cs, [lam * w + TIE_BREAK * w for w in weights], forbid)
        except NoValidPlan:  # a value needed in backward whose every byte is over budget
            return None

    def lagrange_bound(p: Plan, lam: float) -> float:
        # L(lam) = min_P cost(P) + lam*cs*(w(P) - 1) <= OPT, attained by p when p minimises it
        w = sum(weights[i] for i in p.saved)
        return p.cost + lam * cs * (w - 1.0)

    # Grow lambda until the relaxed optimum fits, then bisect in log space.
    lam_lo, lam_hi = 0.0, 1.0
    p_hi = None
    p_lo: Plan | None = None
    steps = 0
    while steps < 60 and time.perf_counter() < deadline:
        p = solve_at(lam_hi)
        steps += 1
        if p is None:
            break
        if single:
            lower = max(lower or 0.0, lagrange_bound(p, lam_hi))
        if p.fits(budget) and p.feasible:
            p_hi = p
            candidates.append(p)
            break
        p_lo = p
        lam_lo, lam_hi = lam_hi, lam_hi * 4.0
    if p_hi is not None:
        for _ in range(iters):
            if time.perf_counter() > deadline or lam_hi / max(lam_lo, 1e-300) < 1.0001:
                break
            lam = math.sqrt(lam_hi * lam_lo) if lam_lo > 0 else lam_hi / 4.0
            p = solve_at(lam)
            steps += 1
            if p is None:
                break
            if single:
                lower = max(lower or 0.0, lagrange_bound(p, lam))
            if p.fits(budget) and p.feasible:
                lam_hi, p_hi = lam, p
                candidates.append(p)
            else:
                lam_lo, p_lo = lam, p
                if lam_lo == 0:
                    break
    log.append(f"heuristic: {steps} minimum cut(s), lambda in [{lam_lo:.4g}, {lam_hi:.4g}]")
    if not candidates:
        pm = min_memory(problem)
        return SolveResult(pm, "heuristic", "infeasible", None, None, time.perf_counter() - t0, log, pm.bytes_at)
    # Two local searches: fill the budget left by the best feasible plan, and repair the
    # cheapest infeasible Lagrangian plan (drop what costs least to recompute per byte).
    share = (deadline - time.perf_counter()) / 2
    best = min(candidates, key=lambda p: (p.cost, p.bytes_at[0]))
    finals = [greedy_fill(problem, best, budget, time.perf_counter() + share)]
    if p_lo is not None and p_lo.feasible:
        repaired = greedy_repair(problem, p_lo, budget, time.perf_counter() + share)
        if repaired is not None:
            finals.append(greedy_fill(problem, repaired, budget, deadline))
    best = min(finals, key=lambda p: (p.cost, p.bytes_at[0]))
    if lower is not None:
        lower = min(lower, best.cost)
    gap = _gap(best.cost, lower)
    status = "optimal" if gap is not None and gap <= 1e-6 else "feasible"
    return SolveResult(best, "heuristic", status, gap, lower, time.perf_counter() - t0, log)


def _excess(plan: Plan, budget: list[int | None]) -> float:
    return sum(max(0, x - b) / max(b, 1) for x, b in zip(plan.bytes_at, budget) if b is not None)


def greedy_repair(problem: Problem, plan: Plan, budget: list[int | None], deadline: float,
                  max_candidates: int = 48) -> Plan | None:
    """From a plan over budget: stop saving (or drop the preact of) whatever adds the least
    recompute cost per byte of excess removed, until it fits. None if time runs out."""
    while not plan.fits(budget):
        if time.perf_counter() > deadline:
            return None
        excess = _excess(plan, budget)
        cands = sorted(plan.saved, key=lambda i: -problem.bytes_at[0][i])[:max_candidates]
        trials = [(plan.saved - {i}, plan.z) for i in cands if problem.bytes_at[0][i] > 0]
        trials += [(plan.saved - {problem.layers[k].preact}, plan.z | {k})
                   for k in range(len(problem.layers)) if k not in plan.z]
        best: tuple[float, Plan] | None = None
        for saved, z in trials:
            q = evaluate(problem, saved, z)
            gain = excess - _excess(q, budget)
            if not q.feasible or gain <= 0:
                continue
            score = max(q.cost - plan.cost, 0.0) / gain
            if best is None or score < best[0]:
                best = (score, q)
        if best is None:
            return None
        plan = best[1]
    return plan


def greedy_fill(problem: Problem, plan: Plan, budget: list[int | None], deadline: float, max_candidates: int = 48) -> Plan:
    """Spend the budget left over: save the recomputed value (or keep the preact) that
    cuts the most recompute cost per byte, while the plan still fits."""
    while time.perf_counter() < deadline:
        options: list[tuple[float, Plan]] = []
        cands = [i for i in plan.recomputed if problem.vertices[i].solver_save]
        cands.sort(key=lambda i: -problem.vertices[i].cost)
        trials: list[tuple[frozenset[int], frozenset[int]]] = [
            (plan.saved | {i}, plan.z) for i in cands[:max_candidates]
        ]
        trials += [(plan.saved | {problem.layers[k].preact}, plan.z - {k}) for k in plan.z]
        for saved, z in trials:
            if time.perf_counter() > deadline:
                break
            q = evaluate(problem, saved, z)
            if q.feasible and q.fits(budget) and q.cost < plan.cost * (1 - 1e-12):
                extra = max(q.bytes_at[0] - plan.bytes_at[0], 0) + 1
                options.append(((plan.cost - q.cost) / extra, q))
        if not options:
            return plan
        plan = max(options, key=lambda t: t[0])[1]
    return plan
