"""Naive form 2: GShard / Switch dense capacity dispatch, top-2.

One-hot masks ``[T, E]``; ``cumsum`` gives each pair's position in its expert's buffer, with
all first choices placed before any second choice; capacity ``ceil(k * cf * T / E)``; pairs
past capacity are dropped; one-hot over positions builds dispatch and combine tensors
``[T, E, C]``; ``einsum("tec,td->ecd")`` fills the expert buffers, a batched MLP runs on
``[E, C, d]``, and ``einsum("tec,ecd->td")`` combines. These tensors grow as T^2.

    blazec dump examples/moe_gshard_top2.py:make
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GShardMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, capacity_factor=1.0):
        super().__init__()
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.wg = nn.Linear(d, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, d, inter) * d**-0.5)
        self.b_in = nn.Parameter(torch.zeros(num_experts, 1, inter).normal_(0, 0.02))
        self.w_out = nn.Parameter(torch.randn(num_experts, inter, d) * inter**-0.5)
        self.b_out = nn.Parameter(torch.zeros(num_experts, 1, d).normal_(0, 0.02))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        T, E = x.shape[0], self.num_experts
        capacity = math.ceil(2 * self.capacity_factor * T / E)

        gates = F.softmax(self.wg(x), dim=1)
        idx1 = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(idx1, E)
        logits_except1 = gates.masked_fill(mask1.bool(), float("-inf"))
        idx2 = torch.argmax(logits_except1, dim=1)
        mask2 = F.one_hot(idx2, E)

        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        locations2_s = torch.sum(locations2 * mask2, dim=1)

        gates1_s = (gates * mask1).sum(dim=1)
        gates2_s = (gates * mask2).sum(dim=1)
        denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
        gates1_s, gates2_s = gates1_s / denom, gates2_s / denom

        gates1 = gates1_s[:, None] * mask1
        gates2 = gates2_s[:, None] * mask2
        loc1 = F.one_hot(locations1_s, capacity)
        loc2 = F.one_hot(locations2_s, capacity)
        combine = gates1[:, :, None] * loc1[:, None, :] + gates2[:, :, None] * loc2[:, None, :]
        dispatch = combine.bool().to(x.dtype)

        expert_in = torch.einsum("tec,td->ecd", dispatch, x)
        h = F.relu(torch.bmm(expert_in, self.w_in) + self.b_in)
        expert_out = torch.bmm(h, self.w_out) + self.b_out
        out = torch.einsum("tec,ecd->td", combine.to(x.dtype), expert_out)
        return out.reshape(shape)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, capacity_factor=1.0, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return GShardMoE(d, inter, num_experts, capacity_factor), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
