"""DeepSeek-V3-style gate: sigmoid scores, a selection-only bias, group-limited top-k, and a
shared expert beside the routed ones. Dispatch is the static loop over a ModuleList.

Selection uses ``scores + bias`` restricted to the best ``topk_group`` expert groups (ranked by
the sum of each group's top-2 biased scores); the routing weights are the *unbiased* scores of
the selected experts, normalized and scaled. The shared expert sees every token.

    blazec dump examples/moe_deepseek_gate.py:make
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepSeekMoE(nn.Module):
    def __init__(self, d=32, inter=24, num_experts=16, top_k=4, n_group=4, topk_group=2, scale=2.5):
        super().__init__()
        self.E, self.top_k, self.n_group, self.topk_group, self.scale = num_experts, top_k, n_group, topk_group, scale
        self.gate_weight = nn.Parameter(torch.randn(num_experts, d) * d**-0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(num_experts) * 0.1)
        self.experts = nn.ModuleList(MLP(d, inter) for _ in range(num_experts))
        self.shared_experts = MLP(d, 2 * inter)

    def route(self, x):
        scores = torch.sigmoid(F.linear(x.float(), self.gate_weight.float()))
        biased = scores + self.e_score_correction_bias
        group_scores = biased.view(-1, self.n_group, self.E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, self.E // self.n_group).reshape(-1, self.E)
        masked = biased.masked_fill(~score_mask.bool(), 0.0)
        topk_idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1]
        topk_w = scores.gather(1, topk_idx)
        topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20) * self.scale
        return topk_idx, topk_w

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_w = self.route(x)
        out = torch.zeros_like(x, dtype=topk_w.dtype)
        mask = F.one_hot(topk_idx, num_classes=self.E).permute(2, 0, 1)  # [E, T, k]
        for e in range(self.E):
            token_idx, slot = torch.where(mask[e])
            y = self.experts[e](x[token_idx])
            out.index_add_(0, token_idx, y * topk_w[token_idx, slot].unsqueeze(-1))
        out = out.to(x.dtype) + self.shared_experts(x)
        return out.reshape(shape)


def make(batch=4, seq=16, d=32, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return DeepSeekMoE(d), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
