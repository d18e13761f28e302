"""Naive form 4: per-pair weight gather and bmm.

Every (token, slot) pair gathers its expert's full weight matrices, ``w1[ids]`` of shape
``[T*k, d, I]``, and runs a batched matmul of one row each. This copies the expert weights
once per pair.

    blazec dump examples/moe_pair_gather_bmm.py:make
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class PairGatherMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, inter) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, inter, d) * inter**-0.5)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        T, d = x.shape
        probs = F.softmax(self.router(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(1)  # [T*k, 1, d]
        h = F.gelu(torch.bmm(xs, self.w1[flat]))  # [T*k, 1, I]
        y = torch.bmm(h, self.w2[flat]).squeeze(1)  # [T*k, d]
        y = (y.view(T, self.top_k, d) * weights.unsqueeze(-1)).sum(dim=1)
        return y.reshape(shape)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, top_k=2, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return PairGatherMoE(d, inter, num_experts, top_k), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
