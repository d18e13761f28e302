"""Load-balanced input samples (FreeScale): cost model, partitioning, sampler and metrics.

In synchronous data-parallel training every step waits for the slowest rank. When samples
have different lengths, a random split of the global batch leaves most ranks idle while the
rank with the longest samples finishes: a "computational bubble". This module estimates each
sample's cost, splits every global batch so that the ranks' summed costs are as equal as
possible, and measures what is left.

Public API:

* ``CostModel`` / ``calibrate``: per-sample cost ``a*L + b*L^2 + c (+ extra features)`` and its
  least-squares fit from measured batch times.
* ``partition`` / ``partition_ranks``: Karmarkar-Karp (default), LPT, greedy, sorted
  round-robin and random partitions, optionally with equal counts and micro-batches.
* ``BalancedBatchSampler``: a ``DataLoader`` batch sampler for torchrun / torch.distributed.
* ``bubble_fraction`` / ``bubble_reduction`` / ``part_costs``: the metrics.

Example::

    sampler = BalancedBatchSampler(ds, global_batch_size=256, lengths=ds.lengths,
                                   cost_model=CostModel.transformer(d_model=1024))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=pad_collate)
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from blazec.runtime._cost import CostModel, calibrate
from blazec.runtime._partition import METHODS, as_cost_list, part_costs, partition
from blazec.runtime._sampler import BalancedBatchSampler, partition_ranks

__all__ = [
    "METHODS",
    "BalancedBatchSampler",
    "CostModel",
    "bubble_fraction",
    "bubble_reduction",
    "calibrate",
    "part_costs",
    "partition",
    "partition_ranks",
]


def bubble_fraction(rank_costs: Sequence[float]) -> float:
    """Idle fraction of a synchronous step: ``1 - mean(rank cost) / max(rank cost)``.

    Every rank waits for the slowest one, so the step takes ``max`` while the useful work is
    ``sum = R * mean``; the rest of the ``R * max`` rank-time is bubble. 0 is perfect balance;
    ``1 - 1/R`` is one rank doing all the work. Defined as 0 when every cost is 0.
    """
    c = as_cost_list(rank_costs, "rank_costs", check_sum=False)
    if not c:
        raise ValueError("rank_costs must not be empty")
    mx = max(c)
    # Each ratio is <= 1, so the mean cannot overflow even when sum(c) would.
    return 0.0 if mx == 0 else 1.0 - math.fsum(x / mx for x in c) / len(c)


def bubble_reduction(bubble: float, baseline_bubble: float) -> float:
    """Relative bubble reduction ``1 - bubble / baseline_bubble`` (0.9 = 90% fewer bubbles).

    Defined as 0 when the baseline has no bubble.
    """
    for name, v in (("bubble", bubble), ("baseline_bubble", baseline_bubble)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"bubble fractions must be finite and >= 0, got {name} = {v}")
    return 0.0 if baseline_bubble == 0 else 1.0 - bubble / baseline_bubble
