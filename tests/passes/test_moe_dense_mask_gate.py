"""The dense-gate form with each expert's gate column spelled from the top-k ids and weights
themselves: ``torch.where(ids == e, w, 0).sum(-1, keepdim=True) * expert_e(x)`` or
``((ids == e) * w).sum(-1).unsqueeze(-1) * expert_e(x)``, summed over every expert (it was
silent: neither rewritten nor reported). Rewritten with eager's numbers and gradients; a column
computed in another dtype than the weights, ids that may repeat in a row, columns of different
weights or a sum that misses an expert are left alone with the reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare


class MaskGate(nn.Module):
    """``variant`` picks the column's spelling (see ``column``), or a flaw to refuse."""

    def __init__(self, variant, d=8, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.k, self.E = variant, k, E
        self.router = nn.Linear(d, E)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, inter), nn.SiLU(), nn.Linear(inter, d))
                                     for _ in range(E))

    def column(self, ids, w, e):
        v = self.v
        if v in ("where", "iadd", "bf16", "ids_dup", "k1", "missing", "not_topk"):
            return torch.where(ids == e, w, 0).sum(-1, keepdim=True)
        if v == "where_zeros_like":
            return torch.where(ids.eq(e), w, torch.zeros_like(w)).sum(dim=-1)[:, None]
        if v == "tensor_where":
            return w.where(ids == e, 0.0).sum(1).unsqueeze(-1)
        if v == "mask_mul":
            return ((ids == e) * w).sum(dim=-1).unsqueeze(-1)
        if v == "mask_cast_rmul":
            return (w * (e == ids).to(w.dtype)).sum(-1)[..., None]
        if v == "mask_long":  # an integer mask times float weights: the weights' dtype
            return ((ids == e).long() * w).sum(-1, keepdim=True)
        if v == "mask_type":
            return (w * (ids == e).type(w.dtype)).sum(-1, keepdim=True)
        if v == "keywords":  # torch.sum(input=...) and torch.eq(input=...) (an IndexError ended the pass)
            return torch.sum(input=torch.where(torch.eq(input=ids, other=e), w, 0), dim=-1, keepdim=True)
        if v == "sum_dtype_same":
            return torch.where(ids == e, w, 0).sum(-1, keepdim=True, dtype=w.dtype)
        if v == "float_mask_bf16":  # the mask cast to fp32 widens a bf16 column
            return ((ids == e).float() * w).sum(-1, keepdim=True)
        if v == "sum_f64":
            return torch.where(ids == e, w, 0).sum(-1, keepdim=True, dtype=torch.float64)
        if v == "two_weights":  # expert 1 weighted by other weights than the rest
            return torch.where(ids == e, w * 2 if e == 1 else w, 0).sum(-1, keepdim=True)
        raise AssertionError(v)

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        if self.v == "not_topk":  # the k best by argsort: a different op, ids not proven distinct
            ids = probs.argsort(dim=-1, descending=True)[:, :self.k]
            w = probs.gather(1, ids)
        else:
            w, ids = probs.topk(self.k, dim=-1)
        if self.v == "ids_dup":  # two equal ids in a row, written in place: refused for the write
            ids = probs.detach().topk(self.k, dim=-1)[1]
            ids[:, 1] = ids[:, 0]
        w = w / w.sum(-1, keepdim=True)
        if self.v in ("bf16", "float_mask_bf16"):
            w = w.to(x.dtype)
        out = torch.zeros_like(x)
        experts = list(self.experts)[:-1] if self.v == "missing" else self.experts
        for e, expert in enumerate(experts):
            term = self.column(ids, w, e) * expert(x)
            if self.v == "iadd":
                out += term
            else:
                out = out + term
        return out


@pytest.mark.parametrize("variant", ["where", "where_zeros_like", "tensor_where", "mask_mul", "mask_cast_rmul",
                                     "mask_long", "mask_type", "keywords", "sum_dtype_same", "iadd"])
def test_mask_gate_rewritten(variant):
    rec = compile_and_compare(MaskGate(variant), (torch.randn(12, 8),))
    assert_rewritten(rec, "dense_gate", E=4, k=2, activation="silu", bias=True)


def test_mask_gate_top1_rewritten():
    rec = compile_and_compare(MaskGate("k1", E=3, k=1), (torch.randn(7, 8),))
    assert_rewritten(rec, "dense_gate", E=3, k=1)


def test_mask_gate_bf16_rewritten():
    model = MaskGate("bf16").to(torch.bfloat16)
    rec = compile_and_compare(model, (torch.randn(12, 8, dtype=torch.bfloat16),), atol=2e-2, rtol=2e-2)
    assert_rewritten(rec, "dense_gate", E=4, k=2)


@pytest.mark.parametrize("variant, reason", [
    ("float_mask_bf16", "is computed in torch.float32 (the mask is cast to it)"),
    ("sum_f64", "is summed in torch.float64"),
    ("two_weights", "weighted by a different gate tensor"),
    ("missing", "missing expert(s) [3]"),
    ("not_topk", "they do not come from topk"),
    ("ids_dup", "writes in place the routing ids"),
])
def test_mask_gate_flaws_left_alone(variant, reason):
    bf16 = variant == "float_mask_bf16"
    model = MaskGate(variant).to(torch.bfloat16) if bf16 else MaskGate(variant)
    x = torch.randn(12, 8, dtype=torch.bfloat16 if bf16 else torch.float32)
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {}
    assert_left_alone(compile_and_compare(model, (x,), **tol), reason, "dense_gate")
