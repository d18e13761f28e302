"""Runtime helpers: sample load balancing and multi-task gradient balancing.

* ``blazec.runtime.balance``: per-sample cost model, Karmarkar-Karp partitioning of global
  batches over ranks and micro-batches, a DataLoader batch sampler, and the bubble metric
  (FreeScale's load-balanced input samples). ``python -m blazec.runtime.balance_sim``
  simulates the bubble of each partitioning method.
* ``blazec.runtime.grad_balance``: ``GradBalancer``, per-task gradient balancing on the shared
  representation of a multi-task model (MultiBalance).

See docs/RUNTIME.md.
"""

from blazec.runtime.balance import (
    BalancedBatchSampler,
    CostModel,
    bubble_fraction,
    bubble_reduction,
    calibrate,
    part_costs,
    partition,
    partition_ranks,
)
from blazec.runtime.grad_balance import GradBalancer

__all__ = [
    "BalancedBatchSampler",
    "CostModel",
    "GradBalancer",
    "bubble_fraction",
    "bubble_reduction",
    "calibrate",
    "part_costs",
    "partition",
    "partition_ranks",
]
