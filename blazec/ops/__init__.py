"""torch.library ops of blazec (the contract between passes and kernels).

Importing this package registers, in the ``blazec`` namespace:

- ``torch.ops.blazec.moe_route``: topk_ids -> expert-sorted pair indices (``route.py``), and
  ``torch.ops.blazec.moe_route_sink``, the same with one id that drops its pairs
- ``torch.ops.blazec.moe_experts`` and ``torch.ops.blazec.moe_experts_backward``: the expert
  MLPs over routed pairs and their backward (``experts.py``)

``_vmap.py`` gives them ``torch.vmap`` rules (a loop over the batch). Their math lives in
``reference.py`` (the CPU reference and the oracle for kernel tests).
Device kernels plug in through ``register_impl`` (``_registry.py``).
"""

from blazec.ops._registry import get_impl, register_impl
from blazec.ops.activations import ACTIVATIONS, GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, is_gated
from blazec.ops.experts import WEIGHT_POSITIONS, moe_experts
from blazec.ops.route import PRIORITIES, moe_route
from blazec.ops import _vmap

_vmap.register()  # torch.vmap and batched gradients: one call per batch element

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "PLAIN_ACTIVATIONS",
    "PRIORITIES",
    "WEIGHT_POSITIONS",
    "get_impl",
    "is_gated",
    "moe_experts",
    "moe_route",
    "register_impl",
]
