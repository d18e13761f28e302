"""Naive form 1b: static loop over experts with 3-D stacked parameters (HF transformers v5 style).

``gate_up_proj [E, 2I, d]`` and ``down_proj [E, d, I]`` are single parameters; each expert
slices its matrix with ``[e]``, applies ``F.linear``, splits gate and up with ``chunk(2)``.
The routing is top-k then softmax over the selected logits (no renormalization needed).

    blazec dump examples/moe_loop_stacked.py:make
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class StackedExperts(nn.Module):
    def __init__(self, d, inter, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inter, d) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, d, inter) * inter**-0.5)

    def forward(self, x, top_k_index, top_k_weights):
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current = x[token_idx]
            gate, up = F.linear(current, self.gate_up_proj[e]).chunk(2, dim=-1)
            current = F.silu(gate) * up
            current = F.linear(current, self.down_proj[e])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


class StackedMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = StackedExperts(d, inter, num_experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        top_vals, top_idx = torch.topk(logits, self.top_k, dim=-1)
        weights = F.softmax(top_vals, dim=-1, dtype=torch.float).to(x.dtype)
        return self.experts(x, top_idx, weights).reshape(shape)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, top_k=2, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return StackedMoE(d, inter, num_experts, top_k), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
