"""The checkpoint solver is optimal on graphs small enough to enumerate, and honest otherwise.

Two kinds of toy problems: random DAGs built directly (hypothesis), and the joint graphs of
small functions traced by AOTAutograd. For each, every saved subset (and every MoE choice)
is enumerated with a reference evaluator written independently of the solver's, and:

- the exact solver's plan is feasible, within budget, and no more expensive than the best
  enumerated plan that fits (and, being a feasible plan, no cheaper either);
- the heuristic's plan is feasible and within budget, and any lower bound it claims is
  below the true optimum;
- with no plan within budget, the solver says so and returns a minimum-memory plan, whose
  bytes are the smallest that enumeration finds.
"""

from __future__ import annotations

import itertools

import pytest
import sympy
import torch
import torch.fx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blazec.config import BlazeConfig
from blazec.partition import partition_joint
from blazec.passes import checkpoint as ck
from blazec.passes.checkpoint_model import FWD, INPUT, MoeLayer, Point, Problem, Vertex
from blazec.passes.checkpoint_solve import TIE_BREAK, min_cost, min_memory, solve, solve_heuristic, solve_ilp

# ---------------------------------------------------------------------------------------
# Reference: enumerate every plan


def reference_plan(pr: Problem, saved: set[int], z: set[int]):
    """(ok, cost, bytes per point) of saving ``saved``: a value the backward needs is either
    saved or recomputed from values that are in turn saved or recomputed. Written as a
    memoised recursion over "which values must exist in backward", apart from the solver."""
    need: set[int] = set()

    def require(i: int) -> bool:
        if i in need:
            return True
        v = pr.vertices[i]
        need.add(i)
        if i in saved and v.can_save:
            return True
        if not v.can_recompute:
            return False
        return all(require(u) for u in v.inputs)

    ok = all(require(v.index) for v in pr.vertices if v.required)
    ok = ok and all(require(layer.preact) for layer in pr.layers if layer.index not in z)
    recomputed = {i for i in need if not (i in saved and pr.vertices[i].can_save)}
    used = need - recomputed
    cost = sum(pr.vertices[i].cost for i in recomputed if pr.vertices[i].kind == FWD)
    cost += sum(pr.layers[k].gemm1_cost for k in z)
    # views share their base's storage: count each storage once
    groups: dict[int, int] = {}
    for i in sorted(used):
        groups.setdefault(i if pr.vertices[i].root is None else pr.vertices[i].root, i)
    return ok, cost, [sum(row[i] for i in groups.values()) for row in pr.bytes_at]


def enumerate_best(pr: Problem, budget: list[int | None]):
    """(best cost within budget or None, smallest bytes at the hints of any valid plan)."""
    free = {v.index for v in pr.vertices if v.can_save and all(row[v.index] == 0 for row in pr.bytes_at)}
    cands = [v.index for v in pr.vertices if v.can_save and v.index not in free]
    # every savable value is enumerated, views included (they share their base's bytes)
    assert len(cands) <= 16, "too many candidates to enumerate"
    best = None
    smallest = None
    for k in range(len(pr.layers) + 1):
        for z in itertools.combinations(range(len(pr.layers)), k):
            for r in range(len(cands) + 1):
                for sub in itertools.combinations(cands, r):
                    ok, cost, by = reference_plan(pr, free | set(sub), set(z))
                    if not ok:
                        continue
                    smallest = by[0] if smallest is None else min(smallest, by[0])
                    if all(b is None or x <= b for x, b in zip(by, budget)):
                        best = cost if best is None else min(best, cost)
    return best, smallest


def _tol(pr: Problem) -> float:
    total = sum(v.cost for v in pr.vertices if v.kind == FWD) + sum(layer.gemm1_cost for layer in pr.layers)
    return 10 * TIE_BREAK * total + 1e-15


def check_against_enumeration(pr: Problem, budget: list[int | None], time_limit: float = 10.0):
    best, smallest = enumerate_best(pr, budget)
    exact = solve(pr, budget, solver="ilp", time_limit=time_limit)
    if smallest is None:  # no valid plan whatever the budget
        assert exact.status == "invalid" and not exact.plan.feasible and exact.log
        return None
    heur = solve_heuristic(pr, budget, start=[min_memory(pr), min_cost(pr)], time_limit=2.0)
    ilp = solve_ilp(pr, budget, time_limit=time_limit)
    # The solver's own evaluator agrees with the reference on the plans it returns.
    for res in (exact, heur) + ((ilp,) if ilp.plan is not None else ()):
        ok, cost, by = reference_plan(pr, set(res.plan.saved), set(res.plan.z))
        assert ok == res.plan.feasible
        if ok:
            assert cost == pytest.approx(res.plan.cost, rel=1e-12, abs=1e-18)
            assert by == res.plan.bytes_at
    if best is None:
        assert ilp.status == "infeasible" and ilp.plan is None
        assert exact.status == "infeasible", exact
        assert exact.plan.feasible
        assert exact.min_memory_bytes[0] == smallest
        assert exact.plan.bytes_at[0] == smallest
        return None
    tol = _tol(pr)
    assert exact.status != "infeasible"
    assert exact.plan.feasible and exact.plan.fits(budget), exact.plan
    assert exact.plan.cost <= best + tol, (exact.plan.cost, best, exact.solver, exact.status)
    assert exact.plan.cost >= best - tol
    # the MILP alone (not only the dispatcher, which may answer with a minimum cut)
    assert ilp.status == "optimal", ilp.log
    assert ilp.plan.feasible and ilp.plan.fits(budget)
    assert best - tol <= ilp.plan.cost <= best + tol, (ilp.plan.cost, best)
    assert heur.plan.feasible and heur.plan.fits(budget)
    assert heur.plan.cost >= best - tol
    if heur.lower_bound is not None:
        assert heur.lower_bound <= best + tol
    return best


# ---------------------------------------------------------------------------------------
# Random DAG problems


def synthetic_problem(spec) -> Problem:
    """Vertices 0..n_in-1 are inputs; the rest are forward ops over earlier vertices, some of
    them views of earlier ops (free to recompute, sharing the base's storage)."""
    n_in, ops, layers, second_point = spec
    g = torch.fx.Graph()
    vertices: list[Vertex] = []
    for i in range(n_in):
        node = g.placeholder(f"in{i}")
        vertices.append(Vertex(index=i, node=node, kind=INPUT, can_recompute=False,
                               no_recompute_reason="graph input"))
    bytes_hint, bytes_other = [0] * n_in, [0] * n_in
    for j, op in enumerate(ops):
        inputs, cost, nbytes, can_save, can_recompute, required = op[:6]
        view_of = op[6] if len(op) > 6 else None  # a view of op ``view_of``: its storage
        i = n_in + j
        root = None
        if view_of is not None:
            root = n_in + view_of
            inputs, cost, can_recompute = [root], 0, True
            nbytes = bytes_hint[root]
        node = g.call_function(torch.ops.aten.relu.default, tuple(vertices[u].node for u in inputs))
        node.name = f"op{j}"
        vertices.append(Vertex(
            index=i, node=node, kind=FWD, inputs=sorted(set(inputs)), can_save=can_save,
            no_save_reason="" if can_save else "tuple", can_recompute=can_recompute,
            no_recompute_reason="" if can_recompute else "random", cost=float(cost),
            bytes_expr=sympy.Integer(nbytes), required=required, root=root,
            view_of_savable=root is not None and vertices[root].can_save,
        ))
        bytes_hint.append(nbytes)
        bytes_other.append(bytes_other[root] if root is not None else nbytes * 3 + (j % 3) * 10 if nbytes else 0)
    moe = []
    for k, (pre, gemm1) in enumerate(layers):
        i = n_in + pre
        vertices[i].required = False
        moe.append(MoeLayer(index=k, fwd=vertices[i].node, bwds=[], preact=i, recompute_now=False,
                            preact_bytes_expr=sympy.Integer(bytes_hint[i]), gemm1_flops_expr=sympy.Integer(0),
                            gemm1_cost=float(gemm1)))
    if not any(v.required for v in vertices) and not moe:
        vertices[-1].required = True
    points = [Point("size hints", {})]
    bytes_at = [bytes_hint]
    if second_point:
        points.append(Point("lower bounds", {}))
        bytes_at.append(bytes_other)
    return Problem(
        vertices=vertices, layers=moe, points=points, bytes_at=bytes_at,
        layer_bytes_at=[[bytes_at[p][layer.preact] for layer in moe] for p in range(len(points))],
        forward_cost=sum(v.cost for v in vertices), forward_flops=0.0, symbols=[], declared_max=False,
        by_node={v.node: v.index for v in vertices},
    )


@st.composite
def problems(draw):
    n_in = draw(st.integers(1, 2))
    n_ops = draw(st.integers(1, 9))
    ops = []
    for j in range(n_ops):
        k = n_in + j
        inputs = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=3))
        earlier = [e for e in range(j) if ops[e][6] is None]
        view_of = draw(st.sampled_from(earlier)) if earlier and draw(st.integers(0, 4)) == 0 else None
        ops.append((
            inputs,
            draw(st.sampled_from([0, 0, 1, 2, 3, 5, 8, 13])),  # recompute cost
            draw(st.sampled_from([0, 100, 200, 300, 500, 800])),  # bytes
            draw(st.booleans()) or draw(st.booleans()),  # can_save (mostly)
            draw(st.integers(0, 5)) > 0,  # can_recompute (mostly)
            draw(st.integers(0, 2)) == 0,  # required
            view_of,  # a view of an earlier op (shares its storage)
        ))
    n_layers = draw(st.integers(0, min(2, n_ops)))
    pres = draw(st.lists(st.integers(0, n_ops - 1), min_size=n_layers, max_size=n_layers, unique=True))
    layers = [(p, draw(st.sampled_from([1, 4, 7, 20]))) for p in pres]
    return n_in, ops, layers, draw(st.booleans())


# Found by this test in CI (2026-11-27): several saved views of one base that cannot itself be
# saved keep one storage; the MILP counted each view's bytes, so it recomputed (cost 1 for 0)
# or called the budget infeasible.
_VIEWS_OF_UNSAVABLE = [([0], 1, 100, False, True, False, None)] + [([0], 0, 0, True, False, True, 0)] * 4 \
    + [([0], 0, 0, False, False, False, 0)]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=problems(), frac=st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.6, 0.8, 1.0]))
@example(spec=(1, _VIEWS_OF_UNSAVABLE, [], False), frac=0.25)
@example(spec=(1, [([0], 0, 100, False, False, False, None)] + _VIEWS_OF_UNSAVABLE[1:], [], False), frac=0.25)
def test_random_dags_match_enumeration(spec, frac):
    pr = synthetic_problem(spec)
    total = [sum(row) for row in pr.bytes_at]
    budget = [int(frac * t) for t in total]
    check_against_enumeration(pr, budget, time_limit=10.0)


def test_moe_choice_is_a_decision():
    """An experts op (cost 10, a tuple: not savable) gives y (800 B, read by the backward)
    and preact (400 B, read only through the layer's decision). Within 1000 B the plan saves
    y and recomputes GEMM1 (cost 3), rather than the whole op (cost 10) or saving preact."""
    spec = (1, [([0], 10, 0, False, True, False), ([1], 0, 800, True, True, True),
                ([1], 0, 400, True, True, False)], [(2, 3)], False)
    pr = synthetic_problem(spec)
    res = solve(pr, [1000], solver="ilp")
    assert res.plan.z == frozenset({0}) and res.plan.cost == pytest.approx(3.0)
    assert res.plan.bytes_at == [800]
    res = solve(pr, [1200], solver="ilp")
    assert res.plan.z == frozenset() and res.plan.cost == 0 and res.plan.bytes_at == [1200]
    assert check_against_enumeration(pr, [1000]) == pytest.approx(3.0)


def test_infeasible_names_smallest_budget_and_falls_back():
    # op0 cannot be recomputed (say, random) and the backward reads it: 500 B are needed.
    spec = (1, [([0], 1, 500, True, False, True), ([1], 1, 300, True, True, True)], [], False)
    pr = synthetic_problem(spec)
    res = solve(pr, [499])
    assert res.status == "infeasible" and res.solver == "min-memory fallback"
    assert res.min_memory_bytes[0] == 500 and res.plan.bytes_at == [500] and res.plan.feasible
    assert check_against_enumeration(pr, [499]) is None


# ---------------------------------------------------------------------------------------
# Joint graphs of small functions


def _capture(fn, *inputs, options=None):
    from functorch.compile import aot_function, make_boxed_func

    config = BlazeConfig.from_options(options or {})
    reports = []

    def partition(gm, joint_inputs, **kwargs):
        fw, bw, rep = partition_joint(gm, joint_inputs, config, **kwargs)
        reports.append(rep)
        return fw, bw

    def nop(gm, _):
        return make_boxed_func(gm.forward)

    with ck.capture() as caps:
        compiled = aot_function(fn, fw_compiler=nop, bw_compiler=nop, partition_fn=partition)
        out = compiled(*inputs)
        out.float().pow(2).sum().backward()
    return caps, reports, out


def mlp(x, w1, w2):
    h = torch.nn.functional.gelu(x @ w1)
    return torch.nn.functional.layer_norm(h @ w2, (w2.shape[1],)).tanh()


def attention(x, wq, wk):
    q, k = x @ wq, x @ wk
    a = (q @ k.transpose(-1, -2) / 4).softmax(-1)
    return (a @ x).sin() + x.cos()


def dropout_mlp(x, w):
    h = (x @ w).relu()
    return torch.nn.functional.dropout(h, 0.5, True).exp() * h.sigmoid()


TOY = {
    "mlp": (mlp, lambda: (torch.randn(8, 16), torch.randn(16, 32), torch.randn(32, 16))),
    "attention": (attention, lambda: (torch.randn(8, 16), torch.randn(16, 16), torch.randn(16, 16))),
    "dropout_mlp": (dropout_mlp, lambda: (torch.randn(8, 16), torch.randn(16, 16))),
}


@pytest.mark.parametrize("name", sorted(TOY))
def test_traced_graphs_match_enumeration(name):
    fn, make = TOY[name]
    inputs = [t.requires_grad_() for t in make()]
    caps, _, _ = _capture(fn, *inputs)
    (cap,) = caps
    pr = cap.problem
    # the default partition is a valid plan in the model, and what it saves is counted
    assert cap.default.feasible, cap.default.violations
    assert cap.default.bytes_at[0] > 0
    bests = []
    for frac in (1.0, 0.7, 0.4, 0.2, 0.0):
        budget = [int(frac * cap.default.bytes_at[0])] + [None] * (len(pr.points) - 1)
        bests.append(check_against_enumeration(pr, budget))
    feasible = [b for b in bests if b is not None]
    assert feasible == sorted(feasible), "a smaller budget cannot make the optimum cheaper"
    assert len(set(feasible)) > 1, "the budgets must exercise a real trade-off"


def test_random_ops_are_never_recomputed():
    inputs = [t.requires_grad_() for t in TOY["dropout_mlp"][1]()]
    caps, reports, _ = _capture(dropout_mlp, *inputs, options={"memory_budget": 0.0})
    pr = caps[0].problem
    random = [v for v in pr.vertices if "random" in v.no_recompute_reason]
    assert random, "the dropout must be in the problem"
    plan = reports[0].checkpoint
    assert plan.status == "infeasible"  # the dropout's output must be kept
    assert all(r.name not in {v.name for v in random} for r in plan.recomputed)
    assert "smallest feasible budget" in plan.message and f"{plan.min_feasible_bytes:,d} B" in plan.message


def test_heuristic_path_end_to_end(monkeypatch):
    """``checkpoint_solver="heuristic"`` (and "auto" past the exact solver's size limit)
    use the Lagrangian min-cut search; its plan fits and reports its lower bound honestly."""
    from blazec.passes import checkpoint_solve

    inputs = [t.requires_grad_() for t in TOY["attention"][1]()]
    caps, reports, _ = _capture(attention, *inputs, options={"memory_budget": 0.3, "checkpoint_solver": "heuristic"})
    plan = reports[0].checkpoint
    assert plan.solver == "heuristic" and plan.fits, plan.lines()
    best, _ = enumerate_best(caps[0].problem, [plan.budget_bytes] + [None] * (len(caps[0].problem.points) - 1))
    assert plan.recompute_us * 1e-6 >= best - _tol(caps[0].problem)
    if plan.lower_bound_us is not None:
        assert plan.lower_bound_us * 1e-6 <= best + _tol(caps[0].problem)
        assert plan.gap is not None and 0 <= plan.gap <= 1
    monkeypatch.setattr(checkpoint_solve, "EXACT_MAX_VERTICES", 0)
    res = solve(caps[0].problem, [plan.budget_bytes] + [None] * (len(caps[0].problem.points) - 1), solver="auto")
    assert res.solver == "heuristic" and any("skipping the exact solver" in line for line in res.log)
    assert res.plan.fits([plan.budget_bytes] + [None] * (len(caps[0].problem.points) - 1))


def test_without_scipy_the_heuristic_answers(monkeypatch):
    """scipy is optional: without it the plan comes from the min-cut heuristic, in budget."""
    import sys

    spec = (1, [([0], 5, 800, True, True, True), ([1], 3, 400, True, True, True), ([2], 1, 300, True, True, True)], [], False)
    pr = synthetic_problem(spec)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    res = solve(pr, [900], solver="ilp")
    assert res.solver == "heuristic" and res.plan.fits([900])
    assert any("exact solver unavailable" in line for line in res.log)
    best, _ = enumerate_best(pr, [900])
    assert res.plan.cost >= best - _tol(pr)
