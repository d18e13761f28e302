"""The blaze backend on models without MoE: the same numbers as Inductor, and the plumbing.

A model with no MoE must compile under blaze exactly as it would under Inductor: the same
outputs and gradients, in training and inference, with fullgraph and dynamic shapes on and off.
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blazec import report
from tests.helpers import cold_graph_caches_env, run_train, slow_cases


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 12)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A small pre-norm transformer block (attention + MLP)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.ln2(x))


class InPlace(nn.Module):
    """In-place ops on activations and a buffer mutated in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        h = self.fc(x)
        h.mul_(2.0).add_(1.0)
        h = torch.relu_(h)
        self.steps.add_(1)
        return h * torch.sigmoid(h)


MODELS = {
    "mlp": (MLP, lambda n: (torch.randn(n, 12),)),
    "transformer_block": (Block, lambda n: (torch.randn(2, n, 16),)),
    "inplace": (InPlace, lambda n: (torch.randn(n, 10),)),
}
SETTINGS = [  # (fullgraph, dynamic): every value of each flag appears
    (False, False),
    (True, True),
    (True, False),
]


def _cases(settings: list) -> list:
    """(name, fullgraph, dynamic) for every model and each of ``settings``, with ids."""
    return [pytest.param(n, fg, dyn, id=f"{n}-{fg}-{dyn}") for n in sorted(MODELS) for fg, dyn in settings]


def _compiled(model, backend, fullgraph, dynamic):
    return torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)


# The transformer block's fullgraph settings (attention: 12-36 s a compile pair on 2 cores) are
# slow; the other two models keep every setting.
@slow_cases("transformer_block-True-True", "transformer_block-True-False")
@pytest.mark.parametrize("name, fullgraph, dynamic", _cases(SETTINGS))
def test_training_matches_inductor(name, fullgraph, dynamic):
    cls, make_inputs = MODELS[name]
    base = cls()
    inputs = make_inputs(6)
    m_ind, m_blaze = copy.deepcopy(base), copy.deepcopy(base)
    ref = run_train(_compiled(m_ind, "inductor", fullgraph, dynamic), inputs)
    got = run_train(_compiled(m_blaze, "blaze", fullgraph, dynamic), inputs)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    assert got[1].keys() == ref[1].keys() and len(got[1]) == len(list(base.parameters()))
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=1e-6, rtol=1e-5)
    for i in ref[2]:
        torch.testing.assert_close(got[2][i], ref[2][i], atol=1e-6, rtol=1e-5)
    for (n, b1), (_, b2) in zip(m_ind.named_buffers(), m_blaze.named_buffers()):
        torch.testing.assert_close(b1, b2, msg=f"buffer {n}")
    # and both against eager, so a shared bug cannot hide
    eager = run_train(copy.deepcopy(base), inputs)
    torch.testing.assert_close(got[0], eager[0], atol=1e-5, rtol=1e-4)


@slow_cases("transformer_block-True-True")
@pytest.mark.parametrize("name, fullgraph, dynamic", _cases(SETTINGS[:2]))
def test_inference_matches_inductor(name, fullgraph, dynamic):
    cls, make_inputs = MODELS[name]
    base = cls().eval()
    inputs = make_inputs(5)
    with torch.no_grad():
        ref = _compiled(copy.deepcopy(base), "inductor", fullgraph, dynamic)(*inputs)
        torch._dynamo.reset()
        got = _compiled(copy.deepcopy(base), "blaze", fullgraph, dynamic)(*inputs)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_dynamic_shapes_do_not_recompile():
    # Batch size 1 is left out: Dynamo specializes sizes 0 and 1 under dynamic=True.
    counter = torch._dynamo.testing.CompileCounterWithBackend("blaze")
    model = MLP()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for n in (2, 7, 64):
        x = torch.randn(n, 12)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("stage", ["eager", "inductor"])
def test_records_partition_and_stage(stage):
    model = MLP()
    with report.capture() as records:
        compiled = torch.compile(model, backend="blaze", options={"final_stage": stage})
        run_train(compiled, (torch.randn(4, 12),))
    assert len(records) == 1
    rec = records[0]
    assert rec.final_stage == stage
    assert [r.name for r in rec.pass_reports if r.name == "moe_dispatch"] == ["moe_dispatch"]
    assert rec.dynamo_graph and rec.blaze_graph and rec.fwd_graphs and rec.bwd_graphs
    (part,) = rec.partitions
    # fc1.weight, fc2.weight and x are needed by backward; fc1's output feeds gelu's backward.
    assert part.total_bytes == sum(s.bytes for s in part.saved) > 0
    names = {s.name for s in part.saved if s.is_input}
    assert len(names) >= 2


def test_disabled_pass_is_reported_as_skipped():
    with report.capture() as records:
        torch.compile(MLP(), backend="blaze", options={"disable_passes": ["moe_dispatch"], "final_stage": "eager"})(
            torch.randn(3, 12)
        )
    reps = {r.name: r for r in records[0].pass_reports}
    assert reps["moe_dispatch"].skipped == "disabled by options"
    assert reps["moe_gating"].skipped is None


def test_failing_pass_leaves_graph_unchanged(monkeypatch):
    """A pass that raises must not break the compile or change the numbers."""
    import blazec.passes.moe_dispatch as mod

    def broken(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "call_function":
                node.target = torch.ops.aten.sin.default  # corrupt the copy, then fail
                break
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "moe_dispatch_pass", broken)
    model = MLP()
    x = torch.randn(3, 12)
    with report.capture() as records:
        out = torch.compile(model, backend="blaze", options={"final_stage": "eager"})(x)
    torch.testing.assert_close(out, model(x))
    rep = next(r for r in records[0].pass_reports if r.name == "moe_dispatch")
    assert "pass raised RuntimeError: boom; graph left unchanged" in rep.near_misses[0].reason


def test_uuid_depends_on_options():
    from blazec.backend import BlazePartitioner, BlazePostGradPass
    from blazec.config import BlazeConfig

    a, b = BlazeConfig.from_options({}), BlazeConfig.from_options({"final_stage": "eager"})
    assert BlazePartitioner(a, None).uuid() == BlazePartitioner(a, None).uuid()
    assert BlazePartitioner(a, None).uuid() != BlazePartitioner(b, None).uuid()
    assert BlazePostGradPass(a, None).uuid() != BlazePartitioner(a, None).uuid()


def test_mode_is_accepted():
    model = MLP()
    x = torch.randn(3, 12)
    out = torch.compile(model, backend="blaze", mode="max-autotune-no-cudagraphs")(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)


def test_capture_dynamic_switch_takes_only_0_or_1() -> None:
    """BLAZEC_CAPTURE_DYNAMIC: 0 leaves Dynamo's capture settings alone (read at import, so in a
    fresh process), 1 turns them on (this process: the variable unset), anything but 0 or 1 is
    an error naming the variable (``false`` or ``off`` left the capture on before)."""
    import subprocess
    import sys

    from blazec.backend import capture_dynamic

    if os.environ.get("BLAZEC_CAPTURE_DYNAMIC", "1") == "1":  # as the suite runs
        assert torch._dynamo.config.capture_dynamic_output_shape_ops and torch._dynamo.config.capture_scalar_outputs
    assert capture_dynamic("1") and capture_dynamic(" 1\n") and not capture_dynamic("0")
    for bad in ("false", "off", "", "2"):
        with pytest.raises(ValueError, match=f"BLAZEC_CAPTURE_DYNAMIC must be 0 or 1 \\(default 1\\), got '{bad}'"):
            capture_dynamic(bad)
    code = ("import torch, blazec.backend; "
            "print(torch._dynamo.config.capture_dynamic_output_shape_ops, torch._dynamo.config.capture_scalar_outputs)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BLAZEC_CAPTURE_DYNAMIC": "0"})
    assert r.returncode == 0 and r.stdout.strip().endswith("False False"), (r.stdout, r.stderr)


_WARM_CACHE = r"""
import contextlib, copy, sys
import torch
from torch._dynamo.utils import counters
from blazec import report
sys.path.insert(0, sys.argv[1])
import moe_gshard_top2, moe_loop_modulelist

# The loop model: two compiles outside report.capture() (there a record's index counts the
# process's compiles: 0, then 1), then one inside it. GShard: cold, then warm, both inside.
for mod, captured in ((moe_loop_modulelist, (False, False, True)), (moe_gshard_top2, (True, True))):
    model, inputs = mod.make()
    runs = []
    for inside in captured:  # each after a reset: the first cold, the others warm
        m = copy.deepcopy(model)
        torch._dynamo.reset()
        counters.clear()
        with report.capture() if inside else contextlib.nullcontext([]) as recs:
            out = torch.compile(m, backend="blaze")(*inputs)
            out.float().pow(2).mean().backward()  # the entry is stored once the backward compiled
        rewritten = sum(len(p.matches) for r in recs for p in r.pass_reports if p.name == "moe_dispatch")
        served = any("AOTAutograd's cache served" in (p.skipped or "") for r in recs for p in r.pass_reports)
        runs.append((out.detach(), [p.grad for p in m.parameters()]))
        print(mod.__name__, rewritten if inside else "-", ",".join(sorted(counters["aot_autograd"])) or "-",
              served if inside else "-")
    (a, ga), *warm = runs
    print(mod.__name__, "equal", all(torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
                                     for b, gb in warm))
"""


def test_rewritten_moe_graphs_use_aotautograd_cache_whatever_the_compiles_number(tmp_path):
    """A rewritten MoE graph went around AOTAutograd's cache on every compile: the user's
    ``y.view(b, s, d)`` read the emitted ``moe_experts(...)[0]``, which had no example value,
    and the cache refuses a ``call_method`` on such a node (GShard's own emitted ``view_as``
    too). The pass now gives its nodes example values. A warm compile (after a reset, with the
    caches on) hits the cache, says so, and gives the cold compile's output and gradients bit
    for bit.

    The cache key also pickled Inductor's config, blaze's partitioner in it, with its report
    record, whose index counts the process's compiles (outside ``report.capture()``): a second
    compile in one process missed the entry the first had saved, and a warm process hit only
    its own Nth compile's entry (cache review). The partitioner pickles as its uuid.
    (A subprocess: tests/conftest.py turns the caches off through the environment.)"""
    import subprocess
    import sys
    from pathlib import Path

    env = cold_graph_caches_env(tmp_path)
    examples = str(Path(__file__).resolve().parents[1] / "examples")
    run = subprocess.run([sys.executable, "-c", _WARM_CACHE, examples], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [l.split() for l in run.stdout.strip().splitlines()]
    loop = [l for l in lines if l[0] == "moe_loop_modulelist"]
    assert len(loop) == 4, run.stdout
    assert "autograd_cache_saved" in loop[0][2], run.stdout  # cold (record index 0)
    assert "autograd_cache_hit" in loop[1][2], run.stdout  # record index 1: the same entry
    assert loop[2][1] == "1" and "autograd_cache_hit" in loop[2][2] and loop[2][3] == "True", run.stdout  # served
    assert loop[3][2] == "True", run.stdout  # equal
    cold, warm, equal = [l for l in lines if l[0] == "moe_gshard_top2"]
    assert cold[1] == warm[1] == "1", run.stdout  # rewritten both times
    assert "autograd_cache_saved" in cold[2] and cold[3] == "False", run.stdout
    assert "autograd_cache_hit" in warm[2] and warm[3] == "True", run.stdout
    assert equal[2] == "True", run.stdout


def test_partitioner_pickles_as_its_uuid():
    import copy
    import pickle

    from blazec.backend import BlazePartitioner
    from blazec.config import BlazeConfig

    cfg = BlazeConfig.from_options({})
    a, b = BlazePartitioner(cfg, report.new_record("inductor")), BlazePartitioner(cfg, report.new_record("inductor"))
    assert pickle.dumps(a) == pickle.dumps(b)
    back = pickle.loads(pickle.dumps(a))
    assert back.uuid() == a.uuid() and pickle.dumps(back) == pickle.dumps(a)
    assert copy.deepcopy(a) is a and copy.copy(a) is a
    other = BlazePartitioner(BlazeConfig.from_options({"memory_budget": 0.5}), None)
    assert pickle.dumps(other) != pickle.dumps(a)


def test_emitted_nodes_get_example_values():
    """Every node of the rewritten graph has the example value later passes and AOTAutograd
    read, and it matches what the graph computes."""
    from blazec import backend
    from blazec.config import BlazeConfig
    from blazec.demo_model import make_default

    seen = {}

    def capture(gm, example_inputs):
        out, _ = backend.run_pre_grad_passes(gm, example_inputs, BlazeConfig.from_options({}))
        seen["gm"] = out
        return out.forward

    model, (x,) = make_default(tokens=64, d=32, inter=48, num_experts=4, top_k=2)
    torch._dynamo.reset()
    torch.compile(model, backend=capture)(x)
    nodes = [n for n in seen["gm"].graph.nodes if n.op in ("call_function", "call_method")]
    assert any("moe_experts" in str(n.target) for n in nodes)
    assert [n.name for n in nodes if "example_value" not in n.meta] == []
    out = next(n for n in nodes if "moe_experts" in str(n.target)).meta["example_value"][0]
    assert tuple(out.shape) == (64, 32) and out.dtype == x.dtype


def test_example_values_follow_the_graphs_grad_mode():
    """The filled values were computed with grad on wherever the node stood: the MoE layer's
    output under the model's ``torch.no_grad()`` block had requires_grad=True, unlike Dynamo's
    own values there."""
    from blazec import backend
    from blazec.config import BlazeConfig
    from blazec.demo_model import make_default

    seen = {}

    def capture(gm, example_inputs):
        out, _ = backend.run_pre_grad_passes(gm, example_inputs, BlazeConfig.from_options({}))
        seen["gm"] = out
        return out.forward

    class NoGradMoE(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.no_grad():
                y = self.inner(x)
            return y * 2, self.inner(x)

    model, (x,) = make_default(tokens=64, d=32, inter=48, num_experts=4, top_k=2)
    torch._dynamo.reset()
    torch.compile(NoGradMoE(model), backend=capture)(x)
    ops = [n for n in seen["gm"].graph.nodes if "moe_experts" in str(n.target)]
    assert len(ops) == 2  # the layer under no_grad, and again with grad
    assert [n.meta["example_value"][0].requires_grad for n in ops] == [False, True]


def test_example_values_leave_dynamo_global_state_nodes_alone():
    """The example-value fill ran every node without one, Dynamo's global-state calls too: a
    ``torch.set_grad_enabled(False)`` left on after the MoE layer turned grad mode off at
    compile time, before AOTAutograd chose between a training and an inference graph, and
    the MoE output came back without a grad_fn (diff review). Only the pass's nodes run."""
    from blazec.demo_model import make_default

    class GradOffAfter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            torch.set_grad_enabled(False)  # left off, as bookkeeping code after a layer might
            return y, (y.detach() * 2).sum()

    model, (x,) = make_default(tokens=64, d=32, inter=48, num_experts=4, top_k=2)
    torch._dynamo.reset()
    try:
        with report.capture() as recs:
            y, _ = torch.compile(GradOffAfter(model), backend="blaze", options={"final_stage": "eager"})(x)
    finally:
        torch.set_grad_enabled(True)
    assert sum(len(p.matches) for r in recs for p in r.pass_reports if p.name == "moe_dispatch") == 1
    assert y.requires_grad and y.grad_fn is not None
