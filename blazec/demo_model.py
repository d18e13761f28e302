"""The default model of ``blazec demo``: a naive Mixtral-style MoE block, embedded in the package.

It is written the way people write MoE layers by hand: a softmax router, top-k,
renormalization, a one-hot expert mask, and a static Python loop over a ModuleList of SwiGLU
experts with ``torch.where`` and ``index_add_``. A residual and an RMSNorm around it make it a
realistic block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLUExpert(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(d, inter, bias=False)
        self.w2 = nn.Linear(inter, d, bias=False)
        self.w3 = nn.Linear(d, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class NaiveMoEBlock(nn.Module):
    def __init__(self, d: int = 128, inter: int = 256, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(d, inter) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden_states.shape
        x = self.norm(hidden_states).view(-1, d)
        routing_weights = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)

        final = torch.zeros((b * s, d), dtype=x.dtype, device=x.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current = self.experts[e](x[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(x.dtype))
        return hidden_states + final.view(b, s, d)


def make_default(tokens: int = 1024, d: int = 128, inter: int = 256, num_experts: int = 8, top_k: int = 2,
                 seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    seq = 64 if tokens % 64 == 0 else tokens
    return NaiveMoEBlock(d, inter, num_experts, top_k), (torch.randn(tokens // seq, seq, d),)
