"""Naive form 5: every expert runs on every token, weighted by a dense [T, E] gate.

The gate keeps the top-k softmax probabilities and zeros the rest with ``scatter``; each
expert's output on all T tokens is multiplied by its gate column and summed.

    blazec dump examples/moe_dense_gate.py:make
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseGateMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, inter), nn.ReLU(), nn.Linear(inter, d)) for _ in range(num_experts)
        )

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        gate = torch.zeros_like(probs).scatter(1, top_i, top_w)  # dense [T, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + gate[:, e : e + 1] * expert(x)
        return out.reshape(shape)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, top_k=2, seed=0):
    """Factory for ``blazec dump``: returns (model, example_inputs)."""
    torch.manual_seed(seed)
    return DenseGateMoE(d, inter, num_experts, top_k), (torch.randn(batch, seq, d),)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
