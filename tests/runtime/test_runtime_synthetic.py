"""The MMoE-style synthetic multi-task generator and the training helper."""

from __future__ import annotations

import pytest
import torch

from blazec.runtime.grad_balance import GradBalancer
from blazec.runtime.synthetic import mmoe_synthetic, train_multitask




@pytest.mark.parametrize("p", [-0.5, 0.0, 0.5, 0.9, 1.0])
def test_linear_parts_have_the_requested_correlation(p):
    # With no sine terms and no noise the labels are w_t^T x, whose correlation is cos(w1, w2) = p.
    d = mmoe_synthetic(50000, p, m=0, noise_std=0.0, seed=1)
    y = torch.cat(d.ys, 1).double()
    corr = torch.corrcoef(y.T)[0, 1].item()
    assert corr == pytest.approx(p, abs=0.02)


def test_task_seed_fixes_the_task_and_scales_apply():
    a = mmoe_synthetic(100, 0.3, seed=1, task_seed=7)
    b = mmoe_synthetic(100, 0.3, seed=2, task_seed=7, scales=(1.0, 10.0))
    c = mmoe_synthetic(100, 0.3, seed=1, task_seed=8)
    assert not torch.equal(a.x, b.x)
    assert not torch.equal(a.ys[0], c.ys[0])
    assert b.ys[1].std() > 5 * b.ys[0].std()
    with pytest.raises(ValueError, match="correlation must be in"):
        mmoe_synthetic(10, 1.5)


def test_train_multitask_learns():
    tr = mmoe_synthetic(2048, 0.5, seed=1, task_seed=0)
    te = mmoe_synthetic(512, 0.5, seed=2, task_seed=0)
    seen = []
    final = train_multitask(tr, te, GradBalancer(2, "magnitude"), steps=150, eval_every=50, on_eval=lambda s, l: seen.append(s))
    assert seen == [50, 100, 150]
    assert all(v < 0.9 for v in final), final  # normalised MSE: 1.0 is predicting the mean
