"""The dense-gate form spelled as one reduction: every expert on every token, the outputs
stacked on dim 1, weighted by a [T, E] top-k scatter gate and summed. Rewritten with eager's
numbers; a soft (dense softmax) gate, a sum in another dtype, or a gate that does not line up
with the stack is left alone with a reason."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare


class DenseStack(nn.Module):
    """``variant``: "plain", "index" (``gate[..., None]``), "torch_sum", "stack_kw"
    (``torch.stack(tensors=...)``), "reversed" (the stack
    lists the experts last to first, the gate flipped to match), "reversed_list" (the same
without the flip), "soft" (a softmax gate, no top-k), "sum_f64",
    "short" (one expert left out of the stack), "ids_dup" (a topk slot overwritten in place),
    "einsum" / "einsum_swapped" (``einsum("te,ted->td", gate, stacked)``, or its operands swapped),
    "einsum_letters" (``einsum("s e, s e m -> s m", gate, stacked)``: other letters, spaces),
    "einsum_soft" (the einsum with the softmax gate)."""

    def __init__(self, variant="plain", d=10, inter=14, E=5, k=2):
        super().__init__()
        self.v, self.k = variant, k
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d))
                                     for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        if self.v == "soft":
            gate = probs
        else:
            w, ids = probs.topk(self.k, dim=-1)
            if self.v == "ids_dup":  # scatter keeps one of two equal ids, the op would sum both
                ids = probs.detach().topk(self.k, dim=-1)[1]
                ids[:, 1] = ids[:, 0]
            gate = torch.zeros_like(probs).scatter(1, ids, w / w.sum(-1, keepdim=True))
        experts = list(self.experts)
        if self.v == "reversed":
            experts, gate = experts[::-1], gate.flip(1)
        if self.v == "reversed_list":  # gate column e weighs the module at stack position e
            experts = experts[::-1]
        if self.v == "short":
            experts = experts[:-1]
            gate = gate[:, :-1]
        outs = [e(x) for e in experts]
        outs = torch.stack(tensors=outs, dim=1) if self.v == "stack_kw" else torch.stack(outs, dim=1)
        g = gate[..., None] if self.v == "index" else gate.unsqueeze(-1)
        if self.v == "torch_sum":
            return torch.sum(outs * g, dim=1)
        if self.v == "sum_f64":
            return (outs * g).sum(dim=1, dtype=torch.float64).float()
        if self.v.startswith("einsum"):  # einsum, einsum_swapped, einsum_soft
            if self.v == "einsum_swapped":
                return torch.einsum("ted,te->td", outs, gate)
            if self.v == "einsum_letters":  # other subscripts, with spaces
                return torch.einsum("s e, s e m -> s m", gate, outs)
            return torch.einsum("te,ted->td", probs if self.v == "einsum_soft" else gate, outs)
        return (outs * g).sum(dim=1)


@pytest.mark.parametrize("variant", ["plain", "index", "torch_sum", "reversed_list", "stack_kw"])
def test_dense_stack_rewritten(variant):
    rec = compile_and_compare(DenseStack(variant), (torch.randn(11, 10),))
    assert_rewritten(rec, "dense_gate_stack", E=5, k=2, activation="gelu", bias=True)
    assert "torch.stack" not in rec.blaze_graph.split("def forward", 1)[1]


@pytest.mark.parametrize("variant", ["einsum", "einsum_swapped", "einsum_letters"])
def test_dense_einsum_rewritten(variant):
    """The same sum as ``torch.einsum("te,ted->td", gate, stacked)`` (it was silent)."""
    rec = compile_and_compare(DenseStack(variant), (torch.randn(11, 10),))
    assert_rewritten(rec, "dense_gate_einsum", E=5, k=2, activation="gelu", bias=True)


def test_dense_einsum_with_a_soft_gate_is_left_alone():
    assert_left_alone(compile_and_compare(DenseStack("einsum_soft"), (torch.randn(11, 10),)),
                      "not built with scatter", "dense_gate_einsum")


@pytest.mark.parametrize("variant, reason", [
    ("soft", "not built with scatter"),
    ("sum_f64", "the expert sum runs in torch.float64"),
    ("reversed", "not built with scatter"),  # the flipped gate is no longer the scatter
    ("short", "not built with scatter"),  # nor is a slice of it
    ("ids_dup", "writes in place the routing ids"),
])
def test_dense_stack_lookalikes_are_left_alone(variant, reason):
    assert_left_alone(compile_and_compare(DenseStack(variant), (torch.randn(11, 10),)), reason, "dense_gate_stack")


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 24), E=st.integers(2, 10), k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_dense_stack_property(T, E, k, seed):
    k = min(k, E)
    torch._dynamo.reset()
    torch.manual_seed(seed)
    rec = compile_and_compare(DenseStack(E=E, k=k), (torch.randn(T, 10),), atol=5e-5, rtol=5e-4)
    assert_rewritten(rec, "dense_gate_stack", E=E, k=k)
