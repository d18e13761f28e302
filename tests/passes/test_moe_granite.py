"""GraniteMoE's and JetMoE's MoE block (HF ``modeling_granitemoe.py`` / ``modeling_jetmoe.py``):
``ParallelExperts`` (a 3-D weight, one ``F.linear`` per split of the sorted rows, concatenated),
counts from a scattered top-k gate, ``sorted.div(k, rounding_mode="trunc")`` tokens and an
out-of-place ``index_add``. Rewritten as the sort form with eager's numbers; code whose counts
or tokens cannot be proven is left alone with a reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare


class ParallelExperts(nn.Module):
    def __init__(self, num_experts, input_size, output_size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, output_size, input_size) * input_size**-0.5)
        self.num_experts = num_experts

    def forward(self, inputs, expert_size):
        input_list = inputs.split(expert_size, dim=0)
        output_list = [F.linear(input_list[i], self.weight[i]) for i in range(self.num_experts)]
        return torch.cat(output_list, dim=0)


class Gating(nn.Module):
    """HF's TopKGating; ``variant`` changes one thing."""

    def __init__(self, d, E, k, variant):
        super().__init__()
        self.E, self.k, self.v = E, k, variant
        self.layer = nn.Linear(d, E, bias=False)

    def forward(self, x):
        logits = self.layer(x).float()
        top_k_logits, top_k_indices = logits.topk(self.k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(x)
        if self.v == "argsort_ids":  # distinct in a row, but not provably so to the matcher
            top_k_indices = logits.argsort(dim=1, descending=True)[:, : self.k]
        if self.v == "histc":
            expert_size = torch.histc(top_k_indices.flatten().float(), bins=self.E, min=0, max=self.E - 1)
            expert_size = expert_size.long().tolist()
        else:
            zeros = torch.zeros([top_k_gates.size(0), self.E], dtype=top_k_gates.dtype, device=x.device)
            gates = zeros.scatter(1, top_k_indices, 1)
            if self.v == "sum_then_cast":  # a float sum: exact here, not for a long sequence in bf16
                expert_size = gates.sum(0).long().tolist()
            else:
                expert_size = gates.long().sum(0).tolist()
        top_k_experts = top_k_indices.flatten()
        _, index_sorted_experts = top_k_experts.sort(0)
        if self.v == "floor_index_add_":
            batch_index = index_sorted_experts.div(self.k, rounding_mode="floor")
        elif self.v == "div_true":
            batch_index = index_sorted_experts.div(self.k).long()
        else:
            batch_index = index_sorted_experts.div(self.k, rounding_mode="trunc")
        batch_gates = top_k_gates.flatten()[index_sorted_experts]
        return batch_index, batch_gates, expert_size


class GraniteMoE(nn.Module):
    def __init__(self, variant="plain", d=16, inter=12, E=4, k=2):
        super().__init__()
        self.d, self.v = d, variant
        self.router = Gating(d, E, k, variant)
        self.input_linear = ParallelExperts(E, d, 2 * inter)
        self.output_linear = ParallelExperts(E, inter, d)

    def forward(self, layer_input):
        bsz, length, emb = layer_input.size()
        layer_input = layer_input.reshape(-1, emb)
        batch_index, batch_gates, expert_size = self.router(layer_input)
        expert_inputs = layer_input[batch_index]
        hidden = self.input_linear(expert_inputs, expert_size)
        chunked = hidden.chunk(2, dim=-1)
        hidden = F.silu(chunked[0]) * chunked[1]
        expert_outputs = self.output_linear(hidden, expert_size)
        expert_outputs = expert_outputs * batch_gates[:, None]
        zeros = torch.zeros((bsz * length, self.d), dtype=expert_outputs.dtype, device=expert_outputs.device)
        if self.v == "floor_index_add_":
            out = zeros.index_add_(0, batch_index, expert_outputs)
        else:
            out = zeros.index_add(0, batch_index, expert_outputs)
        return out.view(bsz, length, self.d)


@pytest.mark.parametrize("variant", ["plain", "histc", "floor_index_add_"])
def test_granite_moe_is_rewritten(variant) -> None:
    torch.manual_seed(0)
    rec = compile_and_compare(GraniteMoE(variant), (torch.randn(2, 7, 16),))
    assert_rewritten(rec, "sort_grouped", E=4, k=2, activation="swiglu")


def test_granite_moe_with_an_empty_expert() -> None:
    torch.manual_seed(1)
    model = GraniteMoE(E=6)
    with torch.no_grad():
        model.router.layer.weight[5] = -10.0  # expert 5 is never picked
    x = torch.randn(1, 5, 16).abs()
    rec = compile_and_compare(model, (x,))
    assert_rewritten(rec, "sort_grouped", E=6)


@pytest.mark.parametrize("variant, reason", [
    ("sum_then_cast", "cannot prove the split sizes are the per-expert counts"),
    ("argsort_ids", "cannot prove the split sizes are the per-expert counts"),
    ("div_true", "not sorted-pair-order // k"),
])
def test_granite_moe_left_alone_when_counts_or_tokens_are_unproven(variant, reason) -> None:
    torch.manual_seed(0)
    rec = compile_and_compare(GraniteMoE(variant), (torch.randn(2, 7, 16),))
    assert_left_alone(rec, reason)
