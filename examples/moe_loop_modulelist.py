"""Naive form 1a: static loop over a ModuleList of experts (Mixtral / HF-transformers style).

Router: linear -> softmax -> top-k -> renormalize. Dispatch: one_hot(topk_ids) permuted to
[E, k, T]; for each expert, ``torch.where(mask[e])`` gives (slot, token) ids, the expert MLP
``w2(silu(w1 x) * w3 x)`` runs on the gathered rows, the result is scaled by the routing
weight and ``index_add_``-ed into a zero accumulator.

    blazec dump examples/moe_loop_modulelist.py:make
    python examples/moe_loop_modulelist.py      # eager vs blaze
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Expert(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(d, inter, bias=False)
        self.w2 = nn.Linear(inter, d, bias=False)
        self.w3 = nn.Linear(d, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, top_k=2, skip_empty=False):
        super().__init__()
        self.num_experts, self.top_k, self.skip_empty = num_experts, top_k, skip_empty
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, inter) for _ in range(num_experts))

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        router_logits = self.gate(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)

        final = torch.zeros((b * s, d), dtype=x.dtype, device=x.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if self.skip_empty and top_x.shape[0] == 0:
                continue
            current_state = x[None, top_x].reshape(-1, d)
            current = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(x.dtype))
        return final.reshape(b, s, d)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, top_k=2, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    model = LoopMoE(d, inter, num_experts, top_k)
    return model, (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
