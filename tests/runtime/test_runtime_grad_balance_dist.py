"""GradBalancer under DDP (2 gloo processes) equals single-process training on the global batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from blazec.runtime.grad_balance import GradBalancer
from runtime_dist_util import run_gloo

GLOBAL_BATCH, TASKS, STEPS = 8, 3, 3


class _MultiTask(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(TASKS))

    def forward(self, x):
        rep = self.shared(x)
        return rep, [h(rep) for h in self.heads]


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64)
    ys = [torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=torch.float64) * 4.0**t for t in range(TASKS)]
    return x, ys


def _train(model, balancer, rank, world, opt):
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, ys = _batch(step)
        sl = slice(rank * per, (rank + 1) * per)
        rep, preds = model(x[sl])
        # Means over the local batch, as DDP expects (it averages gradients over ranks).
        losses = [((p - y[sl]) ** 2).mean() for p, y in zip(preds, ys)]
        opt.zero_grad()
        balancer.backward(losses, rep)
        opt.step()


def _worker(rank, world):
    for method in ("magnitude", "mgda"):
        _check_method(rank, world, method)


def _check_method(rank, world, method):
    torch.manual_seed(0)
    ref = _MultiTask().double()
    ddp = DDP(_MultiTask().double())
    ddp.module.load_state_dict(ref.state_dict())
    bal = GradBalancer(TASKS, method)
    _train(ddp, bal, rank, world, torch.optim.SGD(ddp.parameters(), lr=0.05))
    ref_bal = GradBalancer(TASKS, method, distributed=False)
    _train(ref, ref_bal, 0, 1, torch.optim.SGD(ref.parameters(), lr=0.05))
    torch.testing.assert_close(bal.last_weights, ref_bal.last_weights, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(bal.last_weights, torch.ones(TASKS, dtype=torch.float64))
    for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="single-process"):
        rep, preds = ddp(_batch(0)[0])
        GradBalancer(TASKS, method, mode="param").backward([p.sum() for p in preds], rep)


def test_ddp_equals_single_process_global_batch():
    # One spawn for both methods: starting processes dominates the test's run time.
    run_gloo(_worker, 2)
