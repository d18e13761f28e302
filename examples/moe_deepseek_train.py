"""DeepSeekMoE / DeepSeek-V2 training-path dispatch: every token's row repeated k times, each
expert's rows picked with a boolean mask and written back with a masked assignment, then the
k rows of a token weighted and summed. A shared expert sees every token.

This is what ``DeepseekV2MoE.forward`` runs while ``model.training`` is true. It builds two
[T*k, d] tensors (the repeated rows and the output buffer); blazec's rewrite builds neither.

    blazec dump examples/moe_deepseek_train.py:make
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


class DeepSeekTrainMoE(nn.Module):
    def __init__(self, d=32, inter=24, num_experts=8, top_k=2, shared=True):
        super().__init__()
        self.top_k = top_k
        self.gate_weight = nn.Parameter(torch.randn(num_experts, d) * d**-0.5)
        self.experts = nn.ModuleList(MLP(d, inter) for _ in range(num_experts))
        self.shared_experts = MLP(d, 2 * inter) if shared else None

    def forward(self, hidden_states):
        identity, orig_shape = hidden_states, hidden_states.shape
        hidden_states = hidden_states.view(-1, orig_shape[-1])
        scores = F.linear(hidden_states.float(), self.gate_weight.float()).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        flat_topk_idx = topk_idx.view(-1)
        hidden_states = hidden_states.repeat_interleave(self.top_k, dim=0)
        y = torch.empty_like(hidden_states)
        for i, expert in enumerate(self.experts):
            y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
        y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        y = y.to(hidden_states.dtype).view(*orig_shape)
        return y if self.shared_experts is None else y + self.shared_experts(identity)


def make(batch=4, seq=16, d=32, inter=24, num_experts=8, top_k=2, shared=True, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return DeepSeekTrainMoE(d, inter, num_experts, top_k, shared), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
