"""comm_overlap: functional collectives issued early (ready first, then needed first), waited on late.

Unit tests trace toy functions that call ``torch.ops._c10d_functional`` ops under
FakeTensorMode (no process group needed). The end-to-end test spawns 2 gloo ranks and
compiles a model with a user-written ``funcol.all_reduce`` with ``backend="blaze"``.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from blazec.passes.comm_overlap import comm_overlap_pass, schedule_comms
from blazec.passes.registry import passes_for
from tests.distributed.spawn import run_ranks

c10d = torch.ops._c10d_functional
GROUP = "0"  # a group name is only a string in the graph; fake tracing never resolves it


def _trace(fn, *shapes):
    with FakeTensorMode():
        args = [torch.randn(*s) for s in shapes]
        return make_fx(fn)(*args)


def _order(gm):
    return [n.name for n in gm.graph.nodes]


def _before(order, a, b):
    return order.index(a) < order.index(b)


def _compute_between(order, gm, a, b):
    nodes = {n.name: n for n in gm.graph.nodes}
    names = order[order.index(a) + 1 : order.index(b)]
    return [n for n in names if nodes[n].op == "call_function" and nodes[n].target.namespace == "aten"]


def test_registered_post_grad():
    assert [p.name for p in passes_for("post_grad")] == ["comm_overlap"]


def test_wait_sinks_past_independent_compute_and_collective_rises():
    def f(x, w):
        y = torch.mm(x, w)  # independent of the collective
        a = c10d.wait_tensor(c10d.all_reduce(x, "sum", GROUP))
        z = torch.relu(y)
        h = torch.mm(z, w)
        return a + h

    gm = _trace(f, (8, 16), (16, 16))
    assert _order(gm)[:5] == ["x_1", "w_1", "mm", "all_reduce", "wait_tensor"]
    rep = comm_overlap_pass(gm)
    gm.graph.lint()
    order = _order(gm)
    # issued right after its last input (the placeholder x), waited right before its first use
    assert order[:3] == ["x_1", "w_1", "all_reduce"]
    assert order[order.index("add") - 1] == "wait_tensor"
    assert _compute_between(order, gm, "all_reduce", "wait_tensor") == ["mm", "relu", "mm_1"]
    (m,) = rep.matches
    assert m.where == "all_reduce"
    assert m.details["op"] == "all_reduce"
    assert m.details["issue"] == "3->2" and m.details["wait"] == "4->6"
    assert m.details["compute_between"] == "0->3"
    assert m.details["flops_between"] == f"0->{2 * 8 * 16 * 16 * 2}"  # two [8,16]x[16,16] matmuls


def test_pass_preserves_values():
    """Numerics on real tensors: the single-rank stand-in makes each collective the identity."""

    def f(x, w):
        y = torch.mm(x, w)
        a = c10d.wait_tensor(c10d.all_reduce(y, "sum", GROUP))
        z = torch.tanh(torch.mm(x, w.t()))
        b = c10d.wait_tensor(c10d.all_reduce(z, "sum", GROUP))
        return a * z + b.sum(0)

    gm = _trace(f, (4, 4), (4, 4))
    rep = comm_overlap_pass(gm)
    gm.recompile()
    assert len(rep.matches) == 2
    # replace the collectives with identities to run the reordered graph on one process
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (c10d.all_reduce.default, c10d.wait_tensor.default):
            n.target = torch.ops.aten.clone.default
            n.args = (n.args[0],)
    gm.recompile()
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    ref = torch.mm(x, w) * torch.tanh(torch.mm(x, w.t())) + torch.tanh(torch.mm(x, w.t())).sum(0)
    torch.testing.assert_close(gm(x, w), ref)


def test_two_collectives_keep_program_order():
    # all_gather is issued first in program order, but its result is needed last, and its
    # input is ready later than the all_to_all's: it must still be issued first.
    def f(x, w):
        g_in = torch.relu(torch.mm(x, w))
        g = c10d.wait_tensor(c10d.all_gather_into_tensor(g_in, 2, GROUP))
        t = c10d.wait_tensor(c10d.all_to_all_single(x, [4, 4], [4, 4], GROUP))
        u = torch.mm(t, w)
        v = torch.sigmoid(u)
        return v, g

    gm = _trace(f, (8, 16), (16, 16))
    rep = schedule_comms(gm.graph, order="program")
    gm.graph.lint()
    order = _order(gm)
    assert _before(order, "all_gather_into_tensor", "all_to_all_single")
    assert order.index("all_to_all_single") == order.index("all_gather_into_tensor") + 1
    assert order[order.index("mm_1") - 1] == "wait_tensor_1"  # all_to_all waited right before use
    assert order[order.index("output") - 1] == "wait_tensor"  # all_gather waited at the very end
    assert [m.where for m in rep.matches] == ["all_gather_into_tensor", "all_to_all_single"]
    assert any("kept in program order" in n for n in rep.notes), rep.notes


def test_collectives_in_order_even_when_one_would_rise_above_the_other():
    def f(x, w):
        h = torch.mm(x, w)
        a = c10d.wait_tensor(c10d.reduce_scatter_tensor(h, "sum", 2, GROUP))
        b = c10d.wait_tensor(c10d.all_reduce(x, "sum", GROUP))  # inputs ready at the top
        return a.sum() + b.sum()

    gm = _trace(f, (8, 16), (16, 16))
    schedule_comms(gm.graph, order="program")
    order = _order(gm)
    # all_reduce's input is a placeholder, but it may not be issued before reduce_scatter
    assert order.index("all_reduce") == order.index("reduce_scatter_tensor") + 1
    assert _before(order, "reduce_scatter_tensor", "wait_tensor")


def test_priority_issues_each_collective_when_ready():
    """Default order: all_reduce's input is ready at the top, so it goes before the matmul and
    before reduce_scatter, whose input the matmul makes."""

    def f(x, w):
        h = torch.mm(x, w)
        a = c10d.wait_tensor(c10d.reduce_scatter_tensor(h, "sum", 2, GROUP))
        b = c10d.wait_tensor(c10d.all_reduce(x, "sum", GROUP))
        return a.sum() + b.sum()

    gm = _trace(f, (8, 16), (16, 16))
    rep = comm_overlap_pass(gm)
    gm.graph.lint()
    order = _order(gm)
    assert _before(order, "all_reduce", "mm") and _before(order, "mm", "reduce_scatter_tensor")
    assert any("issued in the order all_reduce, reduce_scatter_tensor" in n for n in rep.notes), rep.notes


def test_priority_breaks_ties_by_first_use():
    """Three collectives whose inputs are all ready at the top: the one needed first goes first."""

    def f(x, y, z, w):
        a = c10d.wait_tensor(c10d.all_reduce(x, "sum", GROUP))  # needed last
        b = c10d.wait_tensor(c10d.all_reduce(y, "sum", GROUP))  # needed second
        c = c10d.wait_tensor(c10d.all_reduce(z, "sum", GROUP))  # needed first
        u = torch.mm(c, w)
        v = torch.mm(b, u)
        return torch.mm(a, v)

    gm = _trace(f, (16, 16), (16, 16), (16, 16), (16, 16))
    comm_overlap_pass(gm)
    gm.graph.lint()
    order = _order(gm)
    colls = [n for n in order if n.startswith("all_reduce")]
    assert colls == ["all_reduce_2", "all_reduce_1", "all_reduce"], order
    for w, mm in (("wait_tensor_2", "mm"), ("wait_tensor_1", "mm_1"), ("wait_tensor", "mm_2")):
        assert order[order.index(mm) - 1] == w, order
    # the same graph in program order keeps x, y, z's order
    gm2 = _trace(f, (16, 16), (16, 16), (16, 16), (16, 16))
    schedule_comms(gm2.graph, order="program")
    assert [n for n in _order(gm2) if n.startswith("all_reduce")] == ["all_reduce", "all_reduce_1", "all_reduce_2"]


def test_side_effects_are_barriers():
    def f(x, w, buf):
        y0 = x * 2
        buf.add_(1.0)  # the collective's input is ready above this mutation: it stays below it
        a = c10d.all_reduce(y0, "sum", GROUP)
        aw = c10d.wait_tensor(a)
        buf.mul_(2.0)  # the wait could sink past mm, but not past this mutation
        y = torch.mm(x, w)
        return aw + y

    gm = _trace(f, (4, 4), (4, 4), (4, 4))
    names = _order(gm)
    rep = comm_overlap_pass(gm)
    gm.graph.lint()
    assert _order(gm) == names
    assert not rep.matches
    assert any("all_reduce: already at its bounds" in n for n in rep.notes), rep.notes

    # without the mutations the same graph is rescheduled
    def g(x, w):
        y0 = x * 2
        aw = c10d.wait_tensor(c10d.all_reduce(y0, "sum", GROUP))
        y = torch.mm(x, w)
        return aw + y

    gm = _trace(g, (4, 4), (4, 4))
    assert [m.where for m in comm_overlap_pass(gm).matches] == ["all_reduce"]
    order = _order(gm)
    assert _before(order, "mm", "wait_tensor")


def test_collective_does_not_rise_above_the_wait_of_an_in_place_collective():
    """all_reduce_(buf) writes buf until its wait; a functional collective reading buf, with an
    unrelated mutation between all_reduce_ and its wait, rose to that mutation, above the wait
    (on 2 gloo ranks it then summed a half-reduced buffer: 1.2e7 where 2.4e7 was right)."""
    aten = torch.ops.aten
    for order in ("priority", "program"):
        g = torch.fx.Graph()
        buf, w, other = g.placeholder("buf"), g.placeholder("w"), g.placeholder("other")
        ar_ = g.call_function(c10d.all_reduce_.default, (buf, "sum", GROUP))
        g.call_function(aten.add_.Tensor, (other, 1.0))
        wt = g.call_function(c10d.wait_tensor.default, (ar_,))
        mm = g.call_function(aten.mm.default, (w, w))
        c2 = g.call_function(c10d.all_reduce.default, (buf, "sum", GROUP))
        w2 = g.call_function(c10d.wait_tensor.default, (c2,))
        g.output(g.call_function(aten.add.Tensor, (w2, mm)))
        schedule_comms(g, order)
        names = [n.name for n in g.nodes]
        assert names.index(c2.name) > names.index(wt.name), (order, names)


def test_collective_does_not_rise_above_random_op():
    def f(x):
        r = torch.rand_like(x)
        y = x * 2
        a = c10d.wait_tensor(c10d.all_reduce(y, "sum", GROUP))
        z = torch.randn_like(x)
        return a + r + z

    gm = _trace(f, (4, 4))
    comm_overlap_pass(gm)
    order = _order(gm)
    # y is ready after rand_like; the wait sinks to just before randn_like, not past it
    rand2 = [n for n in order if n.startswith("randn")][0]
    assert order[order.index(rand2) - 1] == "wait_tensor"


@pytest.mark.parametrize("write", ["index_put", "slice_scatter_of_view", "index_put_into_a_split"])
@pytest.mark.parametrize("traced_late", [False, True])
def test_wait_stays_before_an_op_inductor_may_reinplace_into_the_input(write, traced_late):
    """Inductor's reinplace pass (after this one) turns index_put(a, ...) into index_put_ on a's
    buffer: with the wait of all_to_all_single(a) sunk below it, peers received the written
    values (2 gloo ranks, found in review; plain backend="inductor" does the same when the
    traced code waits late). The wait now comes before such an op, also when traced after it."""
    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w, idx, v = (g.placeholder(n) for n in ("x", "w", "idx", "v"))
    a = g.call_function(aten.mm.default, (x, w))
    c = g.call_function(c10d.all_to_all_single.default, (a, [2, 2], [2, 2], GROUP))
    wt = None if traced_late else g.call_function(c10d.wait_tensor.default, (c,))
    if write == "index_put":
        b = g.call_function(aten.index_put.default, (a, [idx], v))
    elif write == "slice_scatter_of_view":  # a scatter into a view of a: Inductor canonicalizes it onto a
        view = g.call_function(aten.slice.Tensor, (a, 0, 0, 2))
        b = g.call_function(aten.slice_scatter.default, (view, v, 1, 0, 4))
    else:  # a view of a through split's getitem (missed at first: found in review)
        part = g.call_function(operator.getitem, (g.call_function(aten.split.Tensor, (a, 2)), 0))
        b = g.call_function(aten.index_put.default, (part, [idx], v))
    h = g.call_function(aten.mm.default, (x, w))  # compute the wait could otherwise sink past
    if traced_late:
        wt = g.call_function(c10d.wait_tensor.default, (c,))
    g.output((g.call_function(aten.add.Tensor, (wt, h)), b))
    schedule_comms(g)
    names = [n.name for n in g.nodes]
    assert names.index(wt.name) < names.index(b.name), names
    # without the write the wait sinks below the compute as before
    g2 = torch.fx.Graph()
    x, w = g2.placeholder("x"), g2.placeholder("w")
    a = g2.call_function(aten.mm.default, (x, w))
    c = g2.call_function(c10d.all_to_all_single.default, (a, [2, 2], [2, 2], GROUP))
    wt = g2.call_function(c10d.wait_tensor.default, (c,))
    h = g2.call_function(aten.mm.default, (x, w))
    g2.output(g2.call_function(aten.add.Tensor, (wt, h)))
    schedule_comms(g2)
    names = [n.name for n in g2.nodes]
    assert names.index(wt.name) > names.index(h.name), names


@pytest.mark.parametrize("view", ["slice", "unbind"])
def test_traced_writes_into_views_of_a_collectives_input_are_found_by_storage(view):
    """On a traced graph (example values in meta, as post-grad graphs have) the writer is found
    by storage: a view of the collective's input through unbind's getitem too."""

    def f(x, w, idx, v):
        a = torch.mm(x, w)
        wt = c10d.wait_tensor(c10d.all_to_all_single(a, [2, 2], [2, 2], GROUP))
        part = a[:2] if view == "slice" else torch.unbind(a)[0]
        b = torch.index_put(part, (idx,), v)
        return wt + torch.mm(x, w), b

    with FakeTensorMode():
        args = [torch.randn(4, 8), torch.randn(8, 8), torch.tensor([0]),
                torch.randn(1, 8) if view == "slice" else torch.randn(8)]
        gm = make_fx(f)(*args)
    comm_overlap_pass(gm)
    order = _order(gm)
    assert _before(order, "wait_tensor", next(n for n in order if n.startswith("index_put"))), order


def test_a_coalesced_collective_raised_above_a_writer_keeps_its_getitems_before_its_waits():
    """index_put(a) traced before all_reduce_coalesced([a, b]): the collective rises above it,
    and its waits must come back above it, each after its getitem (the waits were moved above
    their getitems, and graph.lint() failed; found in review)."""
    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w, idx, v = (g.placeholder(n) for n in ("x", "w", "idx", "v"))
    a = g.call_function(aten.mm.default, (x, w))
    b = g.call_function(aten.mm.default, (w, w))
    ip = g.call_function(aten.index_put.default, (a, [idx], v))
    c = g.call_function(c10d.all_reduce_coalesced.default, ([a, b], "sum", GROUP))
    g0, g1 = (g.call_function(operator.getitem, (c, i)) for i in range(2))
    w0, w1 = (g.call_function(c10d.wait_tensor.default, (gi,)) for gi in (g0, g1))
    h = g.call_function(aten.mm.default, (x, w))
    g.output((g.call_function(aten.add.Tensor, (w0, h)), w1, ip))
    schedule_comms(g)  # lints the graph
    names = [n.name for n in g.nodes]
    assert names.index(c.name) < names.index(w0.name) < names.index(ip.name), names
    assert names.index(w1.name) < names.index(ip.name), names


def test_coalesced_collective_waits_through_getitem():
    def f(x, y, w):
        outs = c10d.all_gather_into_tensor_coalesced([x, y], 2, GROUP)
        a, b = c10d.wait_tensor(outs[0]), c10d.wait_tensor(outs[1])
        h = torch.mm(x, w)
        return a.sum() + h.sum(), b

    gm = _trace(f, (4, 4), (4, 4), (4, 4))
    rep = comm_overlap_pass(gm)
    gm.graph.lint()
    order = _order(gm)
    assert _before(order, "mm", "wait_tensor")  # first wait right before its sum, after mm
    assert order[order.index("sum_1") - 1] == "wait_tensor"
    assert order[order.index("output") - 1] == "wait_tensor_1"  # the second is only returned
    (m,) = rep.matches
    assert m.details["op"] == "all_gather_into_tensor_coalesced" and m.details["compute_between"] == "0->1"


def test_no_collectives_no_change():
    gm = _trace(lambda x: torch.relu(x) * 2, (3,))
    names = _order(gm)
    rep = comm_overlap_pass(gm)
    assert _order(gm) == names and not rep.matches and not rep.near_misses and not rep.notes


# ---------------------------------------------------------------------------------------
# End to end: 2 gloo ranks, torch.compile(backend="blaze"), eager and Inductor final stages


def _rank_main(rank: int, world: int) -> None:
    import torch.distributed._functional_collectives as funcol

    from blazec import report

    # a warm FX graph / AOTAutograd cache would skip the post-grad hook and so the report
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    params = list(lin1.parameters()) + list(lin2.parameters())

    def f(x):
        s = funcol.all_reduce(lin1(x), "sum", dist.group.WORLD)
        y = torch.relu(lin2(x) @ lin2.weight)  # independent of the all_reduce
        return (s * y).sum()

    x = torch.randn(4, 8) + rank  # different data per rank: the all_reduce matters
    out_ref = f(x)
    grads_ref = torch.autograd.grad(out_ref, params)
    for stage in ("eager", "inductor"):
        torch._dynamo.reset()
        with report.capture() as records:
            out = torch.compile(f, backend="blaze", fullgraph=True, options={"final_stage": stage})(x)
            grads = torch.autograd.grad(out, params)
        torch.testing.assert_close(out, out_ref)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r)
        (rec,) = records
        reps = [r for r in rec.pass_reports if r.name == "comm_overlap"]
        assert len(reps) == 2, [r.name for r in rec.pass_reports]  # forward and backward
        fwd, bwd = (r.matches for r in reps)
        assert len(fwd) == 1 and len(bwd) == 1, (fwd, bwd)
        # forward: the wait moved below lin2's matmuls; backward: the grad all_reduce rose
        w0, w1 = map(int, fwd[0].details["wait"].split("->"))
        assert fwd[0].details["op"] == "all_reduce" and w1 > w0, fwd[0].details
        assert int(fwd[0].details["compute_between"].split("->")[1]) >= 2
        i0, i1 = map(int, bwd[0].details["issue"].split("->"))
        assert bwd[0].details["op"] == "all_reduce" and i1 < i0, bwd[0].details
    # the pass can be turned off like any other
    torch._dynamo.reset()
    with report.capture() as records:
        opts = {"final_stage": "eager", "disable_passes": ["comm_overlap"]}
        out = torch.compile(f, backend="blaze", fullgraph=True, options=opts)(x)
    torch.testing.assert_close(out, out_ref)
    assert not any(r.name == "comm_overlap" and not r.skipped for r in records[0].pass_reports)


@pytest.mark.xdist_group("gloo")  # spawns gloo ranks: one such test at a time (README, "Tests")
def test_two_rank_gloo_compile_matches_eager():
    run_ranks(_rank_main, 2, deadline=240)
