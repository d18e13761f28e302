"""Naive form 3: sort-based grouped experts (argsort, histc counts, cumsum offsets, grouped_mm).

Flattened expert ids are argsorted (stable), rows ``x[perm // k]`` are gathered, counts come
from ``histc``, their ``cumsum`` gives the group offsets, ``torch._grouped_mm`` runs the
gate/up and down projections, the rows are scaled by their routing weights and summed back
per token with ``index_add_``. ``torch._grouped_mm`` only traces for bf16 in torch 2.13 (its
meta function refuses other dtypes), so in other dtypes the same grouped GEMM is a loop over
``rows.split(counts.tolist())``, the other way people write this form.

    blazec dump examples/moe_sort_grouped_mm.py:make
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SortedMoE(nn.Module):
    def __init__(self, d=32, inter=48, num_experts=8, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d, num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(num_experts, d, 2 * inter) * d**-0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, inter, d) * inter**-0.5)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        flat_ids = ids.reshape(-1)
        perm = torch.argsort(flat_ids, stable=True)
        token_of_row = perm // self.top_k
        rows = x[token_of_row]
        # histc has a static output size; bincount(minlength=E) would have a data-dependent one
        counts = torch.histc(flat_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1).long()
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)

        if x.dtype == torch.bfloat16:
            gate, up = torch._grouped_mm(rows, self.w_gate_up, offs=offsets).chunk(2, dim=-1)
            out_rows = torch._grouped_mm(F.silu(gate) * up, self.w_down, offs=offsets)
        else:
            outs = []
            for e, chunk in enumerate(torch.split(rows, counts.tolist())):
                gate, up = (chunk @ self.w_gate_up[e]).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ self.w_down[e])
            out_rows = torch.cat(outs)
        out_rows = out_rows * weights.reshape(-1)[perm, None]
        out = torch.zeros_like(x).index_add_(0, token_of_row, out_rows)
        return out.reshape(shape)


def make(batch=4, seq=16, d=32, inter=48, num_experts=8, top_k=2, seed=0, dtype=torch.float32):
    """Factory for ``blazec dump``: returns (model, example_inputs). bf16 takes the grouped_mm path."""
    torch.manual_seed(seed)
    return SortedMoE(d, inter, num_experts, top_k).to(dtype), (torch.randn(batch, seq, d, dtype=dtype),)


def make_bf16():
    """The grouped_mm spelling: ``blazec dump examples/moe_sort_grouped_mm.py:make_bf16``."""
    return make(dtype=torch.bfloat16)


if __name__ == "__main__":
    from _compare import compare

    compare(make)
