"""GradBalancer against autograd and against slow explicit references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from blazec.runtime._mgda import min_norm_weights
from blazec.runtime.grad_balance import GradBalancer




class _Model(nn.Module):
    def __init__(self, d_in, d_rep, tasks, dtype=torch.float64):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, d_rep), nn.Tanh()).to(dtype)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(d_rep, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype) for _ in range(tasks))

    def losses(self, rep, ys):
        # Different label scales per task make the gradient magnitudes differ, as in practice.
        return [((h(rep) - y) ** 2).mean() for h, y in zip(self.heads, ys)]


def _data(seed, batch, d_in, tasks, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g, dtype=dtype)
    ys = [torch.randn(batch, 1, generator=g, dtype=dtype) * (3.0 ** t) for t in range(tasks)]
    return x, ys


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


# --- references ------------------------------------------------------------------------


def _exact_min_norm(G):
    """Min-norm simplex point by KKT enumeration of supports (independent of _mgda)."""
    T, best = G.shape[0], None
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            S = list(S)
            A = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            A[:r, :r], A[:r, r], A[r, :r] = G[S][:, S], 1.0, 1.0
            b = torch.zeros(r + 1, 1, dtype=torch.float64)
            b[r] = 1.0
            a = torch.linalg.lstsq(A, b, driver="gelsd").solution[:r, 0]
            if (a < -1e-10).any() or abs(a.sum().item() - 1) > 1e-8:
                continue
            alpha = torch.zeros(T, dtype=torch.float64)
            alpha[S] = a.clamp_min(0)
            f = (alpha @ G @ alpha).item()
            if best is None or f < best[0] - 1e-15:
                best = (f, alpha)
    return best[1]


def _ref_weights(kind, flat, state, cfg):
    """Weights of the per-task gradient vectors ``flat`` (T x N), written out explicitly."""
    T = flat.shape[0]
    if kind == "magnitude":
        norms = [flat[t].norm().item() for t in range(T)]
        state["k"] += 1
        state["m"] = [cfg["beta"] * m + (1 - cfg["beta"]) * n for m, n in zip(state["m"], norms)]
        nh = [m / (1 - cfg["beta"] ** state["k"]) for m in state["m"]]
        tgt = cfg["target"]
        tau = {"mean": sum(nh) / T, "max": max(nh), "min": min(nh)}.get(tgt) if isinstance(tgt, str) else nh[tgt]
        return torch.tensor([(1 - cfg["relax"]) + cfg["relax"] * tau / n for n in nh], dtype=torch.float64)
    G = flat @ flat.T
    if cfg["normalize"] == "none":
        return T * _exact_min_norm(G)
    n = G.diagonal().sqrt()
    alpha = _exact_min_norm(G / (n[:, None] * n[None, :]))
    return T * alpha * n.mean() / n


def _ref_rep_mode(model, x, ys, kind, state, cfg):
    """Per-task rep gradients from separate graphs, then J^T g with an explicit Jacobian."""
    T = len(ys)
    shared_params = dict(model.shared.named_parameters())
    rep0 = model.shared(x).detach()
    g = []
    for t in range(T):
        r = rep0.clone().requires_grad_(True)
        g.append(torch.autograd.grad(model.losses(r, ys)[t], r)[0])
    w = _ref_weights(kind, torch.stack([gi.reshape(-1) for gi in g]), state, cfg)
    combined = sum(w[t] * g[t] for t in range(T))
    jac = torch.autograd.functional.jacobian(
        lambda *ps: functional_call(model.shared, dict(zip(shared_params, ps)), (x,)), tuple(shared_params.values())
    )
    shared = [torch.tensordot(combined, J, dims=combined.dim()) for J in jac]
    r = rep0.clone().requires_grad_(True)
    heads = torch.autograd.grad(sum(model.losses(r, ys)), list(model.heads.parameters()))
    return shared, list(heads)


def _ref_param_mode(model, x, ys, kind, state, cfg):
    T = len(ys)
    sp = list(model.shared.parameters())
    per_task = [torch.autograd.grad(model.losses(model.shared(x), ys)[t], sp) for t in range(T)]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in per_task])
    w = _ref_weights(kind, flat, state, cfg)
    shared = [sum(w[t] * per_task[t][i] for t in range(T)) for i in range(len(sp))]
    heads = torch.autograd.grad(sum(model.losses(model.shared(x), ys)), list(model.heads.parameters()))
    return shared, list(heads)


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_equal_matches_autograd_on_summed_loss(tasks):
    torch.manual_seed(0)
    model = _Model(4, 5, tasks)
    x, ys = _data(1, 7, 4, tasks)
    rep = model.shared(x)
    w = GradBalancer(tasks, "equal").backward(model.losses(rep, ys), rep)
    got = _grads(model)
    model.zero_grad()
    sum(model.losses(model.shared(x), ys)).backward()
    assert w.tolist() == [1.0] * tasks
    for a, b in zip(got, _grads(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@given(
    tasks=st.integers(1, 4),
    batch=st.integers(1, 5),
    d_in=st.integers(1, 4),
    d_rep=st.integers(1, 4),
    method=st.sampled_from(["magnitude", "mgda"]),
    mode=st.sampled_from(["rep", "param"]),
    relax=st.sampled_from([0.0, 0.5, 1.0]),
    beta=st.sampled_from([0.0, 0.9]),
    target=st.sampled_from(["mean", "max", "min", 0]),
    normalize=st.sampled_from(["l2", "none"]),
    steps=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_matches_explicit_reference(tasks, batch, d_in, d_rep, method, mode, relax, beta, target, normalize, steps, seed):
    torch.manual_seed(seed)
    model = _Model(d_in, d_rep, tasks)
    cfg = dict(relax=relax, beta=beta, target=target, normalize=normalize)
    own = dict(relax=relax, beta=beta, target=target) if method == "magnitude" else dict(mgda_normalize=normalize)
    bal = GradBalancer(tasks, method, mode=mode, **own)
    state = {"k": 0, "m": [0.0] * tasks}
    ref_fn = _ref_rep_mode if mode == "rep" else _ref_param_mode
    for step in range(steps):  # several steps exercise the EMA
        x, ys = _data(seed + step, batch, d_in, tasks)
        model.zero_grad()
        rep = model.shared(x)
        bal.backward(model.losses(rep, ys), rep)
        got_shared, got_heads = _grads(model.shared), _grads(model.heads)
        ref_shared, ref_heads = ref_fn(model, x, ys, method, state, cfg)
        for a, b in zip(got_shared, ref_shared):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
        for a, b in zip(got_heads, ref_heads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_balancing_changes_the_result():
    # Guards the reference comparison against a balancer that silently falls back to "equal".
    torch.manual_seed(0)
    model = _Model(3, 4, 2)
    x, ys = _data(0, 6, 3, 2)
    rep = model.shared(x)
    GradBalancer(2, "equal").backward(model.losses(rep, ys), rep)
    equal = _grads(model.shared)
    for method in ("magnitude", "mgda"):
        model.zero_grad()
        rep = model.shared(x)
        w = GradBalancer(2, method).backward(model.losses(rep, ys), rep)
        assert not torch.allclose(w, torch.ones(2, dtype=w.dtype))
        assert not all(torch.allclose(a, b) for a, b in zip(_grads(model.shared), equal))


def test_min_norm_solver_against_kkt_enumeration():
    g = torch.Generator().manual_seed(0)
    for trial in range(150):
        T = int(torch.randint(2, 7, (1,), generator=g))
        d = int(torch.randint(1, 8, (1,), generator=g))
        vecs = torch.randn(T, d, generator=g, dtype=torch.float64) * torch.rand(T, 1, generator=g, dtype=torch.float64) * 5
        G = vecs @ vecs.T
        alpha = torch.tensor(min_norm_weights(G.tolist()), dtype=torch.float64)
        assert alpha.min() >= 0 and alpha.sum().item() == pytest.approx(1.0)
        # The min-norm point is unique even where the weights are not.
        torch.testing.assert_close(alpha @ vecs, _exact_min_norm(G) @ vecs, rtol=0, atol=1e-9 * vecs.norm(dim=1).max())


def test_mgda_two_task_closed_form():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    G = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    a = min_norm_weights(G.tolist())
    # min ||a g1 + (1-a) g2||^2 = a^2 + 4 (1-a)^2 -> a = 4/5
    assert a == pytest.approx([0.8, 0.2])
    # Opposed gradients: the min-norm point is 0.
    assert min_norm_weights([[1.0, -1.0], [-1.0, 1.0]]) == pytest.approx([0.5, 0.5])


def test_grad_scaler_matches_unscaled():
    torch.manual_seed(0)
    model = _Model(3, 4, 3, dtype=torch.float32)
    x, ys = _data(2, 8, 3, 3, dtype=torch.float32)
    for method in ("magnitude", "mgda"):
        model.zero_grad()
        bal = GradBalancer(3, method)
        rep = model.shared(x)
        bal.backward(model.losses(rep, ys), rep)
        plain = _grads(model)
        model.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        bal_s = GradBalancer(3, method)
        rep = model.shared(x)
        bal_s.backward(model.losses(rep, ys), rep, scaler=scaler)
        for a, b in zip(_grads(model), plain):
            torch.testing.assert_close(a / 2.0**10, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bal_s.last_weights, bal.last_weights, rtol=1e-5, atol=1e-7)


def test_non_finite_step_keeps_the_ema():
    bal = GradBalancer(2, "magnitude", beta=0.5)
    w1 = bal._magnitude_weights(torch.tensor([1.0, 2.0]))
    state = {k: v.clone() for k, v in bal.state_dict().items()}
    w2 = bal._magnitude_weights(torch.tensor([float("inf"), 2.0]))
    assert bal.state_dict()["ema"][0] == state["ema"][0] and bal.state_dict()["count"][0] == 1
    assert w1.tolist() == pytest.approx([1.5, 0.75])
    # Bias-corrected norms after the skipped step: task 0 has 1 update (0.5 / 0.5 = 1), task 1
    # has 2 (1.5 / 0.75 = 2); the target is their mean, 1.5.
    assert w2.tolist() == pytest.approx([1.5, 0.75])


def test_autocast_bfloat16_close_to_fp32():
    torch.manual_seed(0)
    model = _Model(8, 8, 2, dtype=torch.float32)
    x, ys = _data(3, 16, 8, 2, dtype=torch.float32)
    rep = model.shared(x)
    GradBalancer(2, "magnitude").backward(model.losses(rep, ys), rep)
    ref = _grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep = model.shared(x)
        losses = model.losses(rep, ys)
    assert rep.dtype == torch.bfloat16
    GradBalancer(2, "magnitude").backward([l.float() for l in losses], rep)
    for a, b in zip(_grads(model), ref):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.05 * b.abs().max().item() + 1e-6)


def test_torch_compile_on_model_parts():
    torch.manual_seed(0)
    model = _Model(4, 5, 2, dtype=torch.float32)
    x, ys = _data(4, 6, 4, 2, dtype=torch.float32)
    for method in ("magnitude", "mgda"):
        model.zero_grad()
        rep = model.shared(x)
        GradBalancer(2, method).backward(model.losses(rep, ys), rep)
        ref = _grads(model)
        model.zero_grad()
        shared = torch.compile(model.shared, backend="aot_eager")
        heads = [torch.compile(h, backend="aot_eager") for h in model.heads]
        rep = shared(x)
        GradBalancer(2, method).backward([((h(rep) - y) ** 2).mean() for h, y in zip(heads, ys)], rep)
        for a, b in zip(_grads(model), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rep_as_sequence_and_state_dict():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    head = nn.Linear(4, 1).double()
    x, ys = _data(5, 5, 3, 2)
    bal = GradBalancer(2, "magnitude")
    for _ in range(2):
        r1, r2 = a(x), b(x)
        rep = torch.cat([r1, r2], 1)
        bal.backward([((head(rep) - ys[0]) ** 2).mean(), (rep.sum(1, keepdim=True) - ys[1]).pow(2).mean()], [r1, r2])
    fresh = GradBalancer(2, "magnitude")
    fresh.load_state_dict(bal.state_dict())
    torch.testing.assert_close(fresh.state_dict()["ema"], bal.state_dict()["ema"])
    assert a.weight.grad is not None and b.weight.grad is not None


def test_task_without_rep_gradient_is_handled():
    torch.manual_seed(0)
    shared = nn.Linear(3, 4).double()
    extra = nn.Parameter(torch.ones(1, dtype=torch.float64))
    x, _ = _data(6, 5, 3, 1)
    for method in ("magnitude", "mgda"):
        rep = shared(x)
        w = GradBalancer(2, method).backward([rep.pow(2).mean(), extra.sum() * 2], rep)
        assert torch.isfinite(w).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0), "num_tasks must be an int >= 1, got 0"),
        (dict(num_tasks=2, method="pcgrad"), "unknown method 'pcgrad'"),
        (dict(num_tasks=2, mode="grad"), "unknown mode 'grad'"),
        (dict(num_tasks=2, beta=1.0), r"beta must be in \[0, 1\)"),
        (dict(num_tasks=2, relax=2.0), r"relax must be in \[0, 1\]"),
        (dict(num_tasks=2, target=5), "target must be one of"),
        (dict(num_tasks=2, mgda_normalize="l1"), "mgda_normalize must be"),
        # accepted and ignored before
        (dict(num_tasks=2, method="mgda", beta=0.5), "beta=0.5 would be ignored by method 'mgda'"),
        (dict(num_tasks=2, method="mgda", relax=0.1, target=1), "relax=0.1, target=1 would be ignored"),
        (dict(num_tasks=2, mgda_normalize="none"), "mgda_normalize='none' would be ignored by method 'magnitude'"),
        (dict(num_tasks=2, method="equal", target="max"), "target='max' would be ignored by method 'equal'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradBalancer(**kwargs)


def test_bad_backward_arguments():
    shared = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    rep = shared(x)
    bal = GradBalancer(2)
    with pytest.raises(ValueError, match="expected 2 losses, got 1"):
        bal.backward([rep.sum()], rep)
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        bal.backward([rep.sum(), rep], rep)
    with pytest.raises(ValueError, match="does not require grad"):
        bal.backward([rep.sum(), rep.sum().detach()], rep)
    with pytest.raises(ValueError, match="rep.* must be a tensor that requires grad"):
        bal.backward([rep.sum(), rep.mean()], rep.detach())
    with pytest.raises(ValueError, match="single-process"):
        GradBalancer(2, mode="param", distributed=True).backward([rep.sum(), rep.mean()], rep)
    assert math.isfinite(bal.backward([rep.sum(), rep.mean()], rep)[0].item())


class _AssertNoKeepGraph(torch.autograd.Function):
    """Identity whose backward fails under retain_graph=True, as Inductor's compiled backward
    with donated buffers does (checked without paying for an Inductor compile)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        assert not torch._C._autograd._get_current_graph_task_keep_graph(), "backward ran with retain_graph=True"
        return g


@pytest.mark.parametrize("method", ["equal", "magnitude", "mgda"])
def test_each_head_and_the_bottom_run_backward_once_without_retain_graph(method):
    torch.manual_seed(0)
    model = _Model(3, 4, 3)
    x, ys = _data(7, 5, 3, 3)
    rep = _AssertNoKeepGraph.apply(model.shared(x))
    losses = [((_AssertNoKeepGraph.apply(h(rep)) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    GradBalancer(3, method).backward(losses, rep)
    assert all(p.grad is not None for p in model.parameters())


def test_shared_tower_after_rep_gets_the_plain_sum():
    # Heads share a tower after rep: the tower's nodes are needed by every task, so the graph
    # is kept for all but the last; the tower gets sum_t dL_t/dtower like any head parameter.
    torch.manual_seed(0)
    model = _Model(3, 4, 2)
    tower = nn.Linear(4, 4).double()
    x, ys = _data(8, 6, 3, 2)
    bal = GradBalancer(2, "magnitude", beta=0.0)
    rep = model.shared(x)
    z = torch.tanh(tower(rep))
    bal.backward(model.losses(z, ys), rep)
    got_shared, got_tower = _grads(model.shared), _grads(tower)
    rep0 = model.shared(x).detach().requires_grad_(True)
    g = [torch.autograd.grad(model.losses(torch.tanh(tower(rep0)), ys)[t], rep0)[0] for t in range(2)]
    n = [gi.norm() for gi in g]
    w = [(n[0] + n[1]) / 2 / nt for nt in n]
    ref_shared = torch.autograd.grad(model.shared(x), list(model.shared.parameters()), grad_outputs=w[0] * g[0] + w[1] * g[1])
    ref_tower = torch.autograd.grad(sum(model.losses(torch.tanh(tower(rep0)), ys)), list(tower.parameters()))
    for a, b in zip(got_shared, ref_shared):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_tower, ref_tower):
        torch.testing.assert_close(a, b)


# --- heads that reach the shared bottom other than through rep ------------------------------


def _tied_model():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4).double()  # the shared bottom
    head = nn.Linear(4, 1).double()
    ids = torch.tensor([1, 2, 3])

    def forward():
        rep = emb(ids).tanh()
        # Task 1 reads the bottom's embedding table directly (tied output embedding).
        return rep, [(head(rep) ** 2).mean(), (rep @ emb.weight.t()).logsumexp(-1).mean()]

    return emb, head, forward


@pytest.mark.parametrize("method", ["magnitude", "mgda"])
@pytest.mark.parametrize("retain_graph", [False, True])
def test_head_reading_a_shared_parameter_is_refused(method, retain_graph):
    # Used to raise "backward through the graph a second time", or with retain_graph=True to
    # count task 1's gradient behind rep a second time, unweighted.
    emb, head, forward = _tied_model()
    rep, losses = forward()
    with pytest.raises(ValueError, match=r"losses\[1\] reaches the shared bottom other than through rep.*mode='param'"):
        GradBalancer(2, method).backward(losses, rep, retain_graph=retain_graph)


def test_tied_parameter_equal_and_param_mode_are_exact():
    emb, head, forward = _tied_model()
    rep, losses = forward()
    GradBalancer(2, "equal").backward(losses, rep)
    got = emb.weight.grad.clone()
    emb.zero_grad()
    sum(forward()[1]).backward()
    torch.testing.assert_close(got, emb.weight.grad, rtol=0, atol=0)
    emb.zero_grad()
    rep, losses = forward()
    w = GradBalancer(2, "mgda", mode="param").backward(losses, rep)
    _, (l0, l1) = forward()
    g0 = torch.autograd.grad(l0, emb.weight, retain_graph=True)[0]
    g1 = torch.autograd.grad(l1, emb.weight)[0]
    assert not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(emb.weight.grad, w[0] * g0 + w[1] * g1)


def _skip_model():
    torch.manual_seed(0)
    f1, f2 = nn.Linear(4, 3).double(), nn.Linear(3, 3).double()
    h0, h1 = nn.Linear(3, 1).double(), nn.Linear(6, 1).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def forward():
        h = f1(x).relu()
        rep = f2(h)
        # Head 1 also reads h, an intermediate of the shared bottom (skip connection).
        return h, rep, [(h0(rep) ** 2).mean(), (h1(torch.cat([rep, h], 1)) ** 2).mean()]

    return f1, forward


@pytest.mark.parametrize("method", ["magnitude", "mgda"])
def test_head_reading_an_intermediate_of_the_bottom_is_refused(method):
    f1, forward = _skip_model()
    h, rep, losses = forward()
    with pytest.raises(ValueError, match=r"losses\[1\] reaches the shared bottom other than through rep"):
        GradBalancer(2, method).backward(losses, rep)
    # Passing the intermediate as a rep as well does not help: rep depends on it, and
    # (silently, with retain_graph=True) the task gradients behind it were counted twice.
    h, rep, losses = forward()
    with pytest.raises(ValueError, match="one rep tensor is computed from another"):
        GradBalancer(2, method).backward(losses, [rep, h], retain_graph=True)


def test_skip_connection_param_mode_is_exact():
    f1, forward = _skip_model()
    h, rep, losses = forward()
    w = GradBalancer(2, "magnitude", mode="param").backward(losses, rep)
    _, _, (l0, l1) = forward()
    g0 = torch.autograd.grad(l0, f1.weight, retain_graph=True)[0]
    g1 = torch.autograd.grad(l1, f1.weight)[0]
    torch.testing.assert_close(f1.weight.grad, w[0] * g0 + w[1] * g1)


def _chunk_model():
    torch.manual_seed(0)
    shared = nn.Linear(4, 6).double()
    h0, h1 = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def forward():
        a, b = shared(x).chunk(2, dim=1)  # a.grad_fn is b.grad_fn
        return a, b, [(h0(a) ** 2).mean(), (h1(a + b) ** 2).mean() * 100]

    return shared, nn.ModuleList([h0, h1]), forward


def test_head_reading_a_sibling_output_of_rep_is_refused():
    # Used to drop the gradient through b: the rows of shared.weight only b reaches got 0.
    shared, heads, forward = _chunk_model()
    a, b, losses = forward()
    with pytest.raises(ValueError, match=r"losses\[1\] reads output 1 of SplitBackward0, the op that produced rep\[0\]"):
        GradBalancer(2, "magnitude").backward(losses, a)
    assert shared.weight.grad is None  # refused before any backward


@pytest.mark.parametrize("method", ["magnitude", "mgda"])
def test_all_outputs_of_a_multi_output_op_as_rep_match_reference(method):
    shared, heads, forward = _chunk_model()
    a, b, losses = forward()
    w = GradBalancer(2, method).backward(losses, [a, b])
    got_shared, got_heads = _grads(shared), _grads(heads)
    # By hand: per-task gradients at (a, b), weighted and summed, then J^T through the bottom.
    a, b, losses = forward()
    g = [torch.autograd.grad(l, [a, b], retain_graph=True, allow_unused=True, materialize_grads=True) for l in losses]
    flat = torch.stack([torch.cat([ga.reshape(-1), gb.reshape(-1)]) for ga, gb in g])
    n = flat.norm(dim=1)
    if method == "magnitude":
        ref_w = n.mean() / n  # first step: the bias-corrected EMA is the norm itself
    else:
        alpha = _exact_min_norm(flat @ flat.T / (n[:, None] * n[None, :]))
        ref_w = 2 * alpha * n.mean() / n
    torch.testing.assert_close(w, ref_w)
    ca, cb = (ref_w[0] * g[0][i] + ref_w[1] * g[1][i] for i in range(2))
    ref_shared = torch.autograd.grad([a, b], list(shared.parameters()), [ca, cb], retain_graph=True)
    ref_heads = torch.autograd.grad(sum(losses), list(heads.parameters()))
    assert ref_shared[0][3:].abs().max() > 0.1  # rows only b reaches
    for x, y in zip(got_shared, ref_shared):
        torch.testing.assert_close(x, y)
    for x, y in zip(got_heads, ref_heads):
        torch.testing.assert_close(x, y)


def test_ddp_find_unused_parameters_is_refused(tmp_path):
    # DDP(find_unused_parameters=True) routes rep and the heads' outputs through one
    # _DDPSinkBackward node; the bottom used to get a zero gradient. One gloo rank suffices.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

        def forward(self, x):
            rep = self.shared(x)
            return rep, [h(rep) for h in self.heads]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = DistributedDataParallel(Net(), find_unused_parameters=True)
        rep, preds = net(torch.randn(5, 3))
        with pytest.raises(ValueError, match="_DDPSinkBackward.*find_unused_parameters=True"):
            GradBalancer(2, "magnitude").backward([(p**2).mean() for p in preds], rep)
    finally:
        dist.destroy_process_group()


def test_whole_model_compiled_as_one_graph_is_refused():
    # rep and the heads' outputs come out of one CompiledFunctionBackward node; the bottom used
    # to get a zero gradient. Compiling the bottom and the heads separately works (see
    # test_torch_compile_on_model_parts).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

        def forward(self, x):
            rep = self.shared(x).tanh()
            return rep, [h(rep) for h in self.heads]

    torch.manual_seed(0)
    rep, preds = torch.compile(Net(), backend="aot_eager")(torch.randn(5, 3))
    with pytest.raises(ValueError, match="CompiledFunctionBackward.*compile the shared bottom and the heads separately"):
        GradBalancer(2, "mgda").backward([(p**2).mean() for p in preds], rep)


def test_same_tensor_twice_in_rep_is_refused():
    # Used to seed the bottom with the balanced gradient twice.
    shared = nn.Linear(2, 2)
    rep = shared(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"rep\[1\] is the same tensor as rep\[0\]"):
        GradBalancer(2).backward([rep.sum(), rep.mean()], [rep, rep])


def test_guard_hooks_are_removed():
    # After a refused and after a normal backward, the bottom's node has no hook left: a later
    # backward through it (here the final one of a retained graph) must not raise.
    emb, head, forward = _tied_model()
    rep, losses = forward()
    with pytest.raises(ValueError):
        GradBalancer(2, "magnitude").backward(losses, rep, retain_graph=True)
    rep.sum().backward()
    assert emb.weight.grad is not None


# --- tasks with a zero gradient this step ----------------------------------------------


def _zero_task_setup(seed=0):
    torch.manual_seed(seed)
    shared = nn.Linear(4, 3).double()
    heads = [nn.Linear(3, 1).double() for _ in range(3)]
    x = torch.randn(5, 4, dtype=torch.float64)
    return shared, heads, x


@pytest.mark.parametrize("target", ["mean", "max", "min", 1])
def test_magnitude_zero_gradient_task_is_left_out(target):
    # Task 1 has no signal this step (its loss is multiplied by 0). It used to count in tau:
    # "mean" halved task 0's weight, "min" / anchor 1 zeroed it and the bottom got no update.
    shared, heads, x = _zero_task_setup()
    rep = shared(x)
    losses = [(heads[0](rep) ** 2).mean(), (heads[1](rep) ** 2).mean() * 0.0]
    bal = GradBalancer(2, "magnitude", target=target)
    w = bal.backward(losses, rep)
    assert w.tolist() == [1.0, 1.0]
    assert bal.state_dict()["count"].tolist() == [1.0, 0.0]  # no EMA update from a zero norm
    got = shared.weight.grad.clone()
    shared.zero_grad()
    (heads[0](shared(x)) ** 2).mean().backward()
    torch.testing.assert_close(got, shared.weight.grad)


@pytest.mark.parametrize("target", ["mean", "max", "min", 0, 2])
def test_magnitude_zero_task_after_history_matches_reference(target):
    # Step 1: three live tasks. Step 2: task 2 has a zero gradient; its EMA is kept, it gets
    # weight 1 and is left out of mean/max/min, while as an anchor its EMA stays the target.
    shared, heads, x = _zero_task_setup(1)
    scales = [[1.0, 3.0, 10.0], [1.0, 3.0, 0.0]]
    beta = 0.5
    bal = GradBalancer(3, "magnitude", beta=beta, target=target)
    ema, count = [0.0] * 3, [0] * 3
    for step, sc in enumerate(scales):
        shared.zero_grad()
        rep = shared(x)
        w = bal.backward([(h(rep) ** 2).mean() * s for h, s in zip(heads, sc)], rep)
        got = shared.weight.grad.clone()
        rep0 = shared(x).detach().requires_grad_(True)
        g = [torch.autograd.grad((h(rep0) ** 2).mean() * s, rep0)[0] for h, s in zip(heads, sc)]
        norms = [gi.norm().item() for gi in g]
        live = [t for t in range(3) if norms[t] > 0]
        for t in live:
            ema[t] = beta * ema[t] + (1 - beta) * norms[t]
            count[t] += 1
        nh = [ema[t] / (1 - beta ** count[t]) if count[t] else 0.0 for t in range(3)]
        if isinstance(target, int):
            tau = nh[target]
        else:
            vals = [nh[t] for t in live]
            tau = {"mean": sum(vals) / len(vals), "max": max(vals), "min": min(vals)}[target]
        ref_w = [tau / nh[t] if t in live else 1.0 for t in range(3)]
        assert w.tolist() == pytest.approx(ref_w, rel=1e-12)
        combined = sum(ref_w[t] * g[t] for t in range(3))
        ref = torch.autograd.grad(shared(x), shared.weight, combined)[0]
        torch.testing.assert_close(got, ref)
    assert ref_w[2] == 1.0 and ref_w[:2] != [1.0, 1.0]


@pytest.mark.parametrize("normalize", ["l2", "none"])
def test_mgda_zero_gradient_task_is_left_out(normalize):
    # Unnormalised MGDA used to put all the weight on the zero task (the min-norm point of a
    # hull that contains 0), so the bottom got no update.
    shared, heads, x = _zero_task_setup()
    rep = shared(x)
    losses = [(heads[0](rep) ** 2).mean(), (heads[1](rep) ** 2).mean() * 0.0, (heads[2](rep) ** 2).mean()]
    w = GradBalancer(3, "mgda", mgda_normalize=normalize).backward(losses, rep)
    got = shared.weight.grad.clone()
    rep0 = shared(x).detach().requires_grad_(True)
    g = [torch.autograd.grad((heads[t](rep0) ** 2).mean(), rep0)[0] for t in (0, 2)]
    flat = torch.stack([gi.reshape(-1) for gi in g])
    n = flat.norm(dim=1)
    if normalize == "none":
        ref = 2 * _exact_min_norm(flat @ flat.T)
    else:
        ref = 2 * _exact_min_norm(flat @ flat.T / (n[:, None] * n[None, :])) * n.mean() / n
    torch.testing.assert_close(w, torch.stack([ref[0], torch.tensor(1.0, dtype=ref.dtype), ref[1]]).to(w.dtype))
    combined = ref[0] * g[0] + ref[1] * g[1]
    torch.testing.assert_close(got, torch.autograd.grad(shared(x), shared.weight, combined)[0])


# --- argument checking -----------------------------------------------------------------


def test_bad_rep_and_state_arguments():
    shared = nn.Linear(2, 2)
    rep = shared(torch.randn(3, 2))
    bal = GradBalancer(2)
    with pytest.raises(ValueError, match="rep is empty"):
        bal.backward([rep.sum(), rep.mean()], [])
    with pytest.raises(TypeError, match="rep must be a tensor or a sequence of tensors.*got NoneType"):
        bal.backward([rep.sum(), rep.mean()], None)
    with pytest.raises(TypeError, match=r"rep\[1\] must be a tensor, got int"):
        bal.backward([rep.sum(), rep.mean()], [rep, 1])
    with pytest.raises(ValueError, match="state is missing 'ema', 'count'"):
        bal.load_state_dict({})
    with pytest.raises(TypeError, match="state must be a dict"):
        bal.load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"state\['ema'\] must be a tensor of shape \(2,\)"):
        bal.load_state_dict({"ema": torch.zeros(3), "count": torch.zeros(3)})
    bal.load_state_dict(GradBalancer(2).state_dict())  # the fresh state (None, None) loads
    assert bal.state_dict() == {"ema": None, "count": None}


def test_numpy_scalars_and_bools_in_the_constructor():
    np = pytest.importorskip("numpy")
    bal = GradBalancer(np.int64(2), beta=np.float32(0.5), relax=np.float64(0.25), target=np.int64(1))
    assert (bal.num_tasks, bal.beta, bal.relax, bal.target) == (2, 0.5, 0.25, 1)
    assert type(bal.num_tasks) is int and type(bal.beta) is float and type(bal.target) is int
    with pytest.raises(TypeError, match="beta must be a real number, got str"):
        GradBalancer(2, beta="0.9")
    with pytest.raises(TypeError, match="relax must be a real number, got bool"):
        GradBalancer(2, relax=True)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got nan"):
        GradBalancer(2, beta=float("nan"))


# --- review fixes ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "mgda"])
def test_rep_that_no_loss_reaches_is_refused(method):
    """The heads read one call of the shared bottom and backward got another call's output: it
    used to give weights [1, 1] and the bottom the plain sum's gradient, without an error."""
    torch.manual_seed(0)
    shared, heads = nn.Linear(4, 3), [nn.Linear(3, 1), nn.Linear(3, 1)]
    x = torch.randn(5, 4)
    rep_used = shared(x)
    losses = [heads[0](rep_used).sum(), 100 * heads[1](rep_used).sum()]
    with pytest.raises(ValueError, match="no loss reaches rep: the heads read other tensors than the ones passed as rep"):
        GradBalancer(2, method).backward(losses, shared(x))
    assert shared.weight.grad is None  # refused before any backward
    # One head on rep, the other on a second call of the bottom: that task would skip the balancing.
    rep = shared(x)
    with pytest.raises(ValueError, match=r"losses\[1\] does not reach rep but reaches parameters of the shared bottom"):
        GradBalancer(2, method).backward([heads[0](rep).sum(), heads[1](shared(x)).sum()], rep)
    # A task of its own (no shared parameter, no rep) is still fine, and equal is the plain sum.
    own = nn.Parameter(torch.ones(3))
    rep = shared(x)
    GradBalancer(2, method).backward([heads[0](rep).sum(), (own ** 2).sum()], rep)
    assert own.grad.tolist() == [2.0, 2.0, 2.0]
    GradBalancer(2, "equal").backward([heads[0](rep_used).sum(), heads[1](rep_used).sum()], shared(x))


def test_backward_and_constructor_argument_types():
    shared, head = nn.Linear(2, 2), nn.Linear(2, 1)
    rep = shared(torch.randn(3, 2))
    bal = GradBalancer(1)
    with pytest.raises(TypeError, match="losses must be a sequence of 1 scalar loss tensors, got NoneType"):
        bal.backward(None, rep)
    for scaler in (5, 1.0):
        with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler \(or None\), got"):
            bal.backward([head(rep).sum()], rep, scaler=scaler)
    with pytest.raises(ValueError, match="shared_params= only applies to mode='param'"):
        bal.backward([head(rep).sum()], rep, shared_params=[shared.weight])
    with pytest.raises(TypeError, match=r"num_tasks must be an int, got 2.0 \(float\)"):
        GradBalancer(2.0)
    with pytest.raises(TypeError, match="distributed must be True or False, got 'yes'"):
        GradBalancer(2, distributed="yes")
    assert GradBalancer(2, distributed=False).distributed is False


def test_load_state_dict_checks_values():
    bal = GradBalancer(2)
    with pytest.raises(ValueError, match=r"state\['ema'\] must hold finite norms >= 0, got state\['ema'\]\[0\] = -1.0"):
        bal.load_state_dict({"ema": -torch.ones(2), "count": torch.ones(2)})
    with pytest.raises(ValueError, match=r"state\['ema'\] must hold finite norms >= 0, got state\['ema'\]\[1\] = nan"):
        bal.load_state_dict({"ema": torch.tensor([1.0, math.nan]), "count": torch.ones(2)})
    with pytest.raises(ValueError, match=r"state\['count'\] must hold whole numbers >= 0"):
        bal.load_state_dict({"ema": torch.ones(2), "count": torch.tensor([1.5, 2.0])})
    with pytest.raises(TypeError, match=r"state\['count'\] must hold real numbers, got dtype torch.bool"):
        bal.load_state_dict({"ema": torch.ones(2), "count": torch.ones(2, dtype=torch.bool)})
    # An integer count is a count: it is used as float, like the saved one.
    bal.load_state_dict({"ema": torch.ones(2), "count": torch.ones(2, dtype=torch.int64)})
    rep = nn.Linear(2, 2)(torch.randn(3, 2))
    assert torch.isfinite(bal.backward([rep[:, 0].sum(), rep[:, 1].sum()], rep)).all()


def test_min_norm_with_gradient_scales_far_apart():
    """Unnormalised MGDA with ||g|| from 1e-3 to 4e2: the stopping test was relative to the largest
    ||g||^2, so it stopped at a vertex with ||x||^2 = 4.4e-7, about twice the optimum's 2.36e-7."""
    vs = torch.tensor([[0.2526693587601337, -1.8937297827055335], [0.00021136825223866878, -0.0006842079243385594],
                       [347.97713220660177, 283.70675807921333], [-0.0007055774902055427, -0.0012020227627211886]],
                      dtype=torch.float64)
    G = vs @ vs.T
    alpha = torch.tensor(min_norm_weights(G.tolist()), dtype=torch.float64)
    ref = _exact_min_norm(G)
    assert (alpha @ G @ alpha).item() == pytest.approx((ref @ G @ ref).item(), rel=1e-9)
