"""moe_dispatch on the static loop over experts: what it rewrites, into what, with eager's numbers.

Every spelling of the loop that the pass claims to match (ModuleList / stacked / ``x @ P[e]`` /
fused gate_up, each activation, biases, the routing weight after the down projection or on the
hidden, the three mask spellings, ``where`` / ``nonzero``, the three row gathers, the accumulator
constructors) is compiled with blaze and checked three ways: the report has exactly one match
with the right details, the rewritten graph holds the blaze ops and none of the dispatch, and
the output and every gradient equal eager's.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blazec import report
from blazec.memory import model_tensors, saved_for_backward
from tests.passes.models import (
    ACCS,
    ACTIVATIONS,
    DISPATCH_NEEDLES,
    LAYOUTS,
    MASKS,
    ROWS,
    SELECTS,
    WEIGHT_POS,
    WSPELL,
    Cfg,
    LoopMoE,
    assert_training_close,
    blaze_op_nodes,
    code_lines,
    compile_blaze,
    count_target,
    make,
    moe_report,
    run_blaze,
    train_step,
)

EAGER = {"final_stage": "eager"}

C = Cfg
POSITIVE = [  # together (see the next test) every value of every option, and some of their pairs
    C(),
    C(activation="geglu", bias=True, weight_pos="hidden", mask="permute201", select="nonzero",
      rows="none_reshape", wspell="unsqueeze", acc="zeros_like", cast=False),
    C(layout="modulelist_fused", activation="geglu_tanh", bias=True, mask="eq", rows="index_select",
      acc="new_zeros", num_experts=8, top_k=3),
    C(layout="stacked_linear", activation="gelu", bias=True, weight_pos="hidden", mask="eq",
      select="nonzero", rows="none_reshape", wspell="unsqueeze", acc="new_zeros", cast=False),
    C(layout="stacked_fused", activation="geglu", bias=True, weight_pos="hidden", mask="permute201",
      select="nonzero", rows="index_select", wspell="unsqueeze", acc="zeros_like"),
    C(layout="stacked_matmul", activation="relu", mask="eq", rows="index_select"),
    C(layout="stacked_matmul_fused", weight_pos="hidden", select="nonzero", wspell="unsqueeze",
      acc="zeros_like", num_experts=1, top_k=1),
    C(layout="stacked_linear", activation="silu", bias=True, rows="index_select", num_experts=3, top_k=3),
    C(activation="gelu_tanh", bias=True, weight_pos="hidden", mask="permute201", rows="none_reshape"),
    C(layout="stacked_matmul_method", activation="geglu", mask="permute201", acc="new_zeros"),
]


def test_positive_configs_cover_every_spelling():
    """The list above exercises every value of every option (after ``Cfg.valid``)."""
    cfgs = [c.valid() for c in POSITIVE]
    assert cfgs == POSITIVE, "every listed config must be valid as written"
    for field, values in [("layout", LAYOUTS), ("activation", ACTIVATIONS), ("bias", (False, True)),
                          ("weight_pos", WEIGHT_POS), ("mask", MASKS), ("select", SELECTS), ("rows", ROWS),
                          ("wspell", WSPELL), ("acc", ACCS), ("cast", (False, True))]:
        assert {getattr(c, field) for c in cfgs} == set(values), field
    assert any(c.bias and c.layout.startswith("stacked") and "fused" in c.layout for c in cfgs)
    assert any(c.bias and c.layout == "modulelist_fused" for c in cfgs)


def _check_rewritten(cfg: Cfg, rec, spy):
    rep = moe_report(rec)
    assert rep.near_misses == [], [n.line() for n in rep.near_misses]
    assert len(rep.matches) == 1, [m.line() for m in rep.matches]
    m = rep.matches[0]
    assert m.form == cfg.form
    det = m.details
    assert (det["E"], det["k"], det["d"], det["I"]) == (cfg.num_experts, cfg.top_k, cfg.d, cfg.inter)
    assert det["activation"] == cfg.activation
    assert det["bias"] == cfg.bias
    assert det["weight_pos"] == cfg.weight_pos
    assert det["dtype"] == "float32"

    # The Dynamo graph had the dispatch; the rewritten one has the blaze ops instead.
    (before,), (after,) = spy.before, spy.after
    assert count_target(before, "one_hot" if cfg.mask != "eq" else "eq") >= 1
    assert count_target(before, "index_add_") == cfg.num_experts
    assert count_target(before, "where", "nonzero") == cfg.num_experts
    ops = sorted(str(n.target) for n in blaze_op_nodes(after))
    assert ops == ["blazec.moe_experts.default", "blazec.moe_route.default"], ops
    assert count_target(after, *DISPATCH_NEEDLES) == 0, [
        n.format_node() for n in after.graph.nodes if any(s in str(n.target) for s in DISPATCH_NEEDLES)
    ]
    # ... and so does blaze's own record of the graph it compiled.
    code = "\n".join(code_lines(rec.blaze_graph))
    assert "torch.ops.blazec.moe_experts.default(" in code
    assert "torch.ops.blazec.moe_route.default(" in code
    for gone in ("torch.where(", "nonzero(", "one_hot(", "index_add_("):
        assert gone not in code, gone
    # No data-dependent (unbacked) size is left in the graph.
    assert not re.search(r'"[a-z0-9]+\[[^"]*\bu\d+', code), "unbacked symbol left in the rewritten graph"


def _run_and_compare(cfg: Cfg, T: int = 24, options=EAGER, seed: int = 0):
    model, inputs = make(cfg, T, seed)
    ref_model = copy.deepcopy(model)
    got, records, spy = run_blaze(model, inputs, options)
    ref = train_step(ref_model, inputs)
    assert_training_close(got, ref, expect_params=[n for n, _ in ref_model.named_parameters()])
    assert len(records) == 1
    return records[0], spy


@pytest.mark.parametrize("cfg", POSITIVE, ids=[c.label() for c in POSITIVE])
def test_loop_form_is_rewritten_and_matches_eager(cfg):
    rec, spy = _run_and_compare(cfg)
    _check_rewritten(cfg, rec, spy)


def test_recompute_gemm1_gives_the_same_numbers():
    cfg = POSITIVE[4]  # stacked, fused gate_up with biases, GeGLU, weight on the hidden
    model, inputs = make(cfg, 24)
    ref = train_step(copy.deepcopy(model), inputs)
    m_saved, m_rec = copy.deepcopy(model), copy.deepcopy(model)
    c_saved = compile_blaze(m_saved, EAGER)
    saved = train_step(c_saved, inputs)
    got, records, spy = run_blaze(m_rec, inputs, {**EAGER, "moe_recompute": "recompute_gemm1"})
    (m,) = moe_report(records[0]).matches
    assert m.details["recompute"] == "gemm1"
    (experts,) = [n for n in blaze_op_nodes(spy.after[0]) if "moe_experts" in str(n.target)]
    assert experts.args[13] is True  # the op's `recompute` flag
    assert_training_close(got, ref)
    assert_training_close(got, saved, atol=1e-6, rtol=1e-5)
    # and it keeps less for backward: no [T*k, 2I] pre-activations
    x = inputs[0].clone().requires_grad_()
    _, b_saved = saved_for_backward(lambda: c_saved(x), model_tensors(m_saved, (x,)))
    c_rec = torch.compile(m_rec, backend=spy)  # the same backend: no recompile
    _, b_rec = saved_for_backward(lambda: c_rec(x), model_tensors(m_rec, (x,)))
    assert b_rec.activation_bytes < b_saved.activation_bytes, (b_rec, b_saved)


def test_inductor_final_stage_matches_eager():
    """The default final stage (Inductor codegen) on a stacked layout with biases and the weight on the hidden."""
    cfg = POSITIVE[4]
    rec, spy = _run_and_compare(cfg, T=19, options={})
    assert rec.final_stage == "inductor"
    _check_rewritten(cfg, rec, spy)


def test_inference_no_grad_matches_eager():
    model, (x,) = make(Cfg(layout="stacked_fused", bias=True), 17)
    with torch.no_grad():
        ref = model(x)
        with report.capture() as records:
            got = compile_blaze(model, EAGER)(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert len(moe_report(records[0]).matches) == 1


class _Reversed(LoopMoE):
    """Experts visited in reverse order: still every expert exactly once."""

    def experts_range(self):
        return range(self.cfg.num_experts - 1, -1, -1)


class _AuxReadsRouting(LoopMoE):
    """The where() outputs are also read outside the dispatch (an aux term); they must survive."""

    def forward(self, x):
        w, ids = self.route(x)
        acc, mask = self.new_acc(x), self.expert_mask(ids)
        aux = x.new_zeros(())
        for e in self.experts_range():
            tok, slot = self.select(mask, ids, e)
            aux = aux + w[tok, slot].sum() * (e + 1)
            self.accumulate(acc, tok, self.contribution(e, x, w, tok, slot))
        return acc + aux


class _ExpertOutputReused(LoopMoE):
    """Each weighted expert output is also used elsewhere; those nodes must survive."""

    def forward(self, x):
        w, ids = self.route(x)
        acc, mask = self.new_acc(x), self.expert_mask(ids)
        extra = x.new_zeros(())
        for e in self.experts_range():
            tok, slot = self.select(mask, ids, e)
            y = self.contribution(e, x, w, tok, slot)
            extra = extra + y.pow(2).sum()
            self.accumulate(acc, tok, y)
        return acc * (1 + extra)


class _ShiftedModules(LoopMoE):
    """Loop index e runs module experts[(e + 1) % E]: a relabelling, still a valid MoE."""

    def run_expert(self, e, rows, hidden_scale=None):
        return super().run_expert((e + 1) % self.cfg.num_experts, rows, hidden_scale)


class _FrozenExpert(LoopMoE):
    """Expert 0 is frozen: its weights must get no gradient, the others theirs."""

    def __init__(self, cfg):
        super().__init__(cfg)
        for p in self.experts[0].parameters():
            p.requires_grad_(False)


class _SharedExpert(LoopMoE):
    """Experts 0 and 1 are the same module: its gradient is the sum over both expert slots."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.experts[1] = self.experts[0]


@pytest.mark.parametrize("cls, cfg", [
    (_Reversed, Cfg(mask="eq")),
    (_AuxReadsRouting, Cfg(layout="stacked_linear", bias=True)),
    (_ExpertOutputReused, Cfg(weight_pos="hidden")),
    (_ShiftedModules, Cfg()),
    (_FrozenExpert, Cfg(bias=True)),
    (_SharedExpert, Cfg(activation="relu")),
], ids=["reversed_order", "aux_reads_where", "expert_output_reused", "shifted_modulelist", "frozen_expert",
        "shared_expert_module"])
def test_valid_variants_are_rewritten_and_match_eager(cls, cfg):
    torch.manual_seed(0)
    model, inputs = cls(cfg), (torch.randn(24, cfg.d),)
    ref = train_step(copy.deepcopy(model), inputs)
    got, records, spy = run_blaze(model, inputs, EAGER)
    assert_training_close(got, ref)
    (m,) = moe_report(records[0]).matches
    assert m.details["E"] == cfg.num_experts
    assert len(blaze_op_nodes(spy.after[0])) == 2


# ---------------------------------------------------------------------------------------
# Property test: random sizes, options and skewed routing


@st.composite
def moe_cases(draw):
    E = draw(st.one_of(st.integers(1, 4), st.integers(1, 16)))  # all of 1..16, small ones more often
    k = draw(st.integers(1, min(E, 4)))
    cfg = Cfg(
        layout=draw(st.sampled_from(LAYOUTS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        weight_pos=draw(st.sampled_from(WEIGHT_POS)),
        mask=draw(st.sampled_from(MASKS)),
        select=draw(st.sampled_from(SELECTS)),
        rows=draw(st.sampled_from(ROWS)),
        wspell=draw(st.sampled_from(WSPELL)),
        acc=draw(st.sampled_from(ACCS)),
        d=draw(st.integers(1, 8)),
        inter=draw(st.integers(1, 6)),
        num_experts=E,
        top_k=k,
    ).valid()
    T = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 31]))
    skew = draw(st.sampled_from(["none", "one_expert", "empty_experts"]))
    hot = draw(st.integers(0, E - 1))
    cold = draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=max(1, E - k)))
    return cfg, T, skew, hot, sorted(cold), draw(st.integers(0, 2**16))


def _apply_skew(model: LoopMoE, skew: str, hot: int, cold: list[int]):
    with torch.no_grad():
        if skew == "one_expert":  # every token's first choice is expert `hot`
            model.router_offset[hot] = 30.0
        elif skew == "empty_experts":  # experts in `cold` get (almost surely) no token
            model.router_offset[cold] = -30.0


@settings(max_examples=16, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=moe_cases())
@example(case=(Cfg(num_experts=16, top_k=4, d=3, inter=5), 13, "empty_experts", 0, list(range(0, 12)), 1))
@example(case=(Cfg(layout="stacked_fused", bias=True, num_experts=5, top_k=1, d=4, inter=3), 1, "one_expert", 3, [0], 2))
@example(case=(Cfg(layout="stacked_matmul", activation="relu", mask="eq", num_experts=7, top_k=2, d=2, inter=2),
               13, "one_expert", 6, [0], 3))
def test_property_random_moe_matches_eager(case):
    cfg, T, skew, hot, cold, seed = case
    torch._dynamo.reset()
    model, inputs = make(cfg, T, seed)
    _apply_skew(model, skew, hot, cold)
    ref = train_step(copy.deepcopy(model), inputs)
    got, records, spy = run_blaze(model, inputs, EAGER)
    assert_training_close(got, ref, expect_params=[n for n, _ in model.named_parameters()])
    assert len(records) == 1
    (m,) = moe_report(records[0]).matches
    assert (m.details["E"], m.details["k"], m.details["activation"]) == (cfg.num_experts, cfg.top_k, cfg.activation)
    assert len(blaze_op_nodes(spy.after[0])) == 2


def test_skewed_routing_really_is_skewed():
    """The skew helper does what the property test relies on (so that test cannot pass vacuously)."""
    model, (x,) = make(Cfg(num_experts=8, top_k=2), 31)
    _apply_skew(model, "one_expert", 5, [])
    _, ids = model.route(x)
    assert (ids[:, 0] == 5).all()
    model, (x,) = make(Cfg(num_experts=8, top_k=2), 31)
    _apply_skew(model, "empty_experts", 0, [1, 2, 3])
    _, ids = model.route(x)
    assert not torch.isin(ids, torch.tensor([1, 2, 3])).any()


# ---------------------------------------------------------------------------------------
# Dynamic shapes and fullgraph


def test_dynamic_batch_compiles_once_and_matches_eager():
    cfg = Cfg(layout="stacked_fused", bias=True, weight_pos="hidden")
    torch.manual_seed(0)
    model = LoopMoE(cfg)
    ref_model = copy.deepcopy(model)
    import functools

    from blazec.backend import blaze

    counter = torch._dynamo.testing.CompileCounterWithBackend(functools.partial(blaze, options=EAGER))
    compiled = torch.compile(model, backend=counter, dynamic=True)
    with report.capture() as records:
        for T in (2, 7, 64):
            x = torch.randn(T, cfg.d)
            assert_training_close(train_step(compiled, (x,)), train_step(ref_model, (x,)))
        assert counter.frame_count == 1
        # Batch size 1: Dynamo specializes sizes 0 and 1 even under dynamic=True (a size-1 dim
        # broadcasts), so T=1 does not satisfy the guard `T >= 2` of the first graph and compiles a
        # second, static graph. That one is rewritten too and must match eager.
        x = torch.randn(1, cfg.d)
        assert_training_close(train_step(compiled, (x,)), train_step(ref_model, (x,)))
        assert counter.frame_count <= 2
        # The dynamic graph is still used for new sizes after that.
        x = torch.randn(33, cfg.d)
        assert_training_close(train_step(compiled, (x,)), train_step(ref_model, (x,)))
    assert counter.frame_count <= 2
    assert len(records) == counter.frame_count
    for rec in records:
        (m,) = moe_report(rec).matches
        assert m.form == "static_loop_stacked"
        assert "torch.ops.blazec.moe_experts.default(" in "\n".join(code_lines(rec.blaze_graph))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_fullgraph_on_and_off(fullgraph):
    torch.manual_seed(0)
    model, inputs = LoopMoE(Cfg(mask="permute201", select="nonzero")), (torch.randn(24, 16),)
    ref = train_step(copy.deepcopy(model), inputs)
    got, records, spy = run_blaze(model, inputs, EAGER, fullgraph=fullgraph)
    assert_training_close(got, ref)
    # The whole loop is one graph (data-dependent where() is captured) either way.
    assert len(records) == 1
    assert len(moe_report(records[0]).matches) == 1
    assert len(blaze_op_nodes(spy.after[0])) == 2


def test_cfg_label_is_unique():
    labels = [c.label() for c in POSITIVE]
    assert len(labels) == len(set(labels))
    assert dataclasses.replace(Cfg(), layout="stacked_fused", activation="relu").valid().layout == "stacked_linear"
