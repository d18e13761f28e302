"""Multi-process checks under gloo: the sampler with 2 and 4 ranks, GradBalancer under DDP.

One spawn per world size runs every check of that size: starting the processes (each imports
torch) costs more than the checks themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from blazec.runtime.balance import BalancedBatchSampler, CostModel
from blazec.runtime.grad_balance import GradBalancer
from runtime_dist_util import run_gloo

pytestmark = pytest.mark.xdist_group("gloo")  # spawns gloo ranks: one such test at a time (README, "Tests")

# --- BalancedBatchSampler: shares disjoint, covering, deterministic ----------------------

N, B, MICRO, SEED = 61, 16, 2, 11


def _lengths():
    g = torch.Generator().manual_seed(SEED)
    p = torch.arange(1, 257, dtype=torch.float64).pow(-1.2)
    return torch.multinomial(p / p.sum(), N, replacement=True, generator=g) + 1


def _run(sampler):
    batches = list(sampler)
    return [batches[i : i + sampler.micro_batches] for i in range(0, len(batches), sampler.micro_batches)]


def _check_sampler(rank, world):
    L = _lengths()
    model = CostModel.transformer(64)
    # Lengths known up front: no communication; cost_fn: one all_gather per step, here with
    # the partition of the next step computed on the background thread.
    known = BalancedBatchSampler(N, B, lengths=L, cost_model=model, micro_batches=MICRO, seed=SEED)
    gathered = BalancedBatchSampler(
        N, B, cost_fn=lambda i: model([L[i]]).item(), micro_batches=MICRO, seed=SEED, prefetch=True
    )
    assert (known.rank, known.world_size) == (rank, world)
    mine_known = _run(known)
    mine_gathered = _run(gathered)
    assert mine_gathered == mine_known
    assert _run(known) == mine_known, "a second pass over the same epoch must repeat it"

    everyone = [None] * world
    dist.all_gather_object(everyone, mine_known)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED)).tolist()
    steps = N // B
    single = BalancedBatchSampler(N, B, lengths=L, cost_model=model, rank=0, world_size=world, micro_batches=MICRO, seed=SEED)
    for s in range(steps):
        shares = [everyone[r][s] for r in range(world)]
        flat = [i for share in shares for mb in share for i in mb]
        assert len(flat) == len(set(flat)) == B, "rank shares must be disjoint"
        assert sorted(flat) == sorted(order[s * B : (s + 1) * B]), "rank shares must cover the global batch"
        assert all(len(share) == MICRO and all(share) for share in shares)
        assert shares == single.step_partition(s), "must equal the single-process partition"

    known.set_epoch(1)
    assert _run(known) != mine_known

    # A failing cost_fn on one rank raises on every rank instead of hanging the others.
    def bad(i):
        if rank == world - 1:
            raise RuntimeError("unreadable sample")
        return 1.0

    broken = BalancedBatchSampler(N, B, cost_fn=bad, seed=SEED)
    with pytest.raises(ValueError, match="cost_fn failed for sample"):
        list(broken)


# --- GradBalancer under DDP equals single-process training on the global batch -----------

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


def _worker(rank, world):
    _check_sampler(rank, world)
    if world == 2:
        for method in ("magnitude", "mgda"):
            _check_method(rank, world, method)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo(world):
    run_gloo(_worker, world)
