"""The expert-parallel equivalence check, run inside each spawned rank.

Every rank builds the same model (same seed) and feeds its own batch ``x_r``. The
single-process reference runs the eager model on every rank's batch. Expert parallelism
must give, on rank r:

- the reference output and input gradient for ``x_r``;
- for every parameter, after summing the gradients over ranks (what data-parallel gradient
  reduction does), the reference gradient of ``sum_r loss_r``: the owning rank alone holds an
  expert's gradient, and the router's gradient is each rank's share;
- no gradient at all for the experts this rank does not own (they are not used).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from blazec import report
from blazec.expert_parallel import is_expert_param, sync_grads


def batches(shape, world: int, skew=None):
    """One input per rank (fresh seeds); ``skew(x)`` can bend them toward some experts."""
    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(1000 + r)) for r in range(world)]
    return [skew(x) for x in xs] if skew else xs


def check_ep(rank: int, world: int, model, xs, options: dict, atol=2e-5, rtol=1e-4, group=None):
    """Compile ``model`` expert-parallel, run rank ``rank``'s batch, compare; return the records.

    ``rank``/``world`` are within ``group`` (default: the world group, given as "world"), and
    ``xs`` holds one batch per member.
    """
    ref = copy.deepcopy(model)
    gs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(2000 + r)) for r, x in enumerate(xs)]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="blaze", options={"expert_parallel": group or "world", **options})
    x = xs[rank].clone().requires_grad_()
    with report.capture() as records:
        y = compiled(x)
        (y * gs[rank]).sum().backward()

    xr = [t.clone().requires_grad_() for t in xs]
    yr = [ref(t) for t in xr]
    sum((a * g).sum() for a, g in zip(yr, gs)).backward()
    torch.testing.assert_close(y, yr[rank], atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, xr[rank].grad, atol=atol, rtol=rtol)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        dist.all_reduce(g, group=group)
        torch.testing.assert_close(g, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")

    # sync_grads reduces exactly the non-expert gradients: then every rank holds the full
    # gradient of every dense parameter and of its own experts (all of them for a layer
    # rewritten single-process: its experts do not split over the ranks)
    single = any(n.form == "expert_parallel" for rec in records for r in rec.pass_reports for n in r.near_misses)
    if single or any(is_expert_param(p) for p in model.parameters()):
        before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and is_expert_param(p)}
        sync_grads(model, group or "world")
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if is_expert_param(p):  # untouched: the owner already holds every rank's contribution
                assert p.grad is None if name not in before else torch.equal(p.grad, before[name]), name
            else:
                torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"synced {name}: {m}")
    return records


def moe_matches(records):
    return [m for rec in records for r in rec.pass_reports if r.name == "moe_dispatch" for m in r.matches]


def reports(records, name):
    return [r for rec in records for r in rec.pass_reports if r.name == name]
