"""``blazec::moe_route``: turn ``topk_ids`` into expert-sorted pair indices (no token buffers).

Schema::

    blazec::moe_route(Tensor topk_ids, int num_experts, int capacity=-1, str priority="token")
        -> (Tensor sorted_pairs, Tensor expert_offsets, Tensor pair_pos)

Pair p = t*k + j is slot j of token t. ``sorted_pairs [T*k]`` lists the kept pairs grouped by
expert (expert 0 first), in priority order within an expert ("token": increasing p; "slot":
GShard order, increasing j*T + t), then -1 for the dropped ones. ``expert_offsets [E+1]`` are
the cumulative kept counts. ``pair_pos [T*k]`` is the inverse map: the position of pair p in
``sorted_pairs``, or -1 when p was dropped. ``capacity >= 0`` keeps each expert's first
``capacity`` pairs in priority order; -1 keeps all. All outputs are int64 with static sizes.

The outputs are integers, so the op has no autograd formula. The math is in
``reference.moe_route``; a device kernel can replace it through ``blazec.ops._registry``.
"""

import itertools
import os

import torch
from torch import Tensor

from blazec._args import as_int
from blazec.ops._registry import get_impl

PRIORITIES: tuple[str, ...] = ("token", "slot")

ROUTE_SCHEMA = (
    "(Tensor topk_ids, int num_experts, int capacity=-1, str priority=\"token\") "
    "-> (Tensor sorted_pairs, Tensor expert_offsets, Tensor pair_pos)"
)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_route_args(topk_ids: Tensor, num_experts: int, capacity: int, priority: str) -> None:
    """Metadata checks, shared by the real and the fake implementation."""
    if topk_ids.dim() != 2:
        raise ValueError(
            f"moe_route: topk_ids must be 2-D [T, k], got {topk_ids.dim()}-D of shape "
            f"{tuple(topk_ids.shape)}"
        )
    if not _is_integer_dtype(topk_ids.dtype):
        raise ValueError(f"moe_route: topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if not 1 <= num_experts < 2**31:  # the route kernels count in int32
        raise ValueError(f"moe_route: num_experts must be in [1, 2**31), got {num_experts}")
    if capacity < -1:
        raise ValueError(f"moe_route: capacity must be >= 0, or -1 for no limit; got {capacity}")
    if priority not in PRIORITIES:
        raise ValueError(f"moe_route: priority must be one of {PRIORITIES}, got {priority!r}")


def id_range_message(num_experts: int) -> str:
    return f"moe_route: topk_ids must lie in [0, num_experts={num_experts})"


def check_ids_in_range(topk_ids: Tensor, num_experts: int) -> None:
    # Data-dependent, so only in the real implementation; an out-of-range id would otherwise
    # corrupt the offsets silently. On the CPU it raises a ValueError with the values found. On
    # an accelerator it is a device-side assert with the same message: a host check would cost
    # one sync per MoE layer (and per expert-parallel chunk) and break CUDA graphs. An
    # implementation whose ``CHECKS_ID_RANGE`` is true checks on its own (the Triton kernels,
    # in their count and scan launches).
    if topk_ids.numel() == 0:
        return
    msg = id_range_message(num_experts)
    if topk_ids.device.type != "cpu":
        torch._assert_async(((topk_ids >= 0) & (topk_ids < num_experts)).all(), msg)
        return
    lo, hi = (int(v) for v in torch.aminmax(topk_ids.to(torch.int64)))
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"{msg}, got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# Route marks: which (sorted_pairs, expert_offsets, pair_pos) are one route as moe_route built it
# ----------------------------------------------------------------------------------------------

_MARK = "_blazec_route"
# A mark is a plain tuple (nonce, serial, (data pointers, versions)): one that torch.save writes
# with the tensors loads under weights_only=True, and is not taken for the loaded tensors (other
# memory; in another process, another nonce).
_NONCE = int.from_bytes(os.urandom(8), "little")
_SERIALS = itertools.count()


def _state(a: Tensor, b: Tensor, c: Tensor) -> tuple:
    """What a mark pins down: the tensors' memory (a copy, or a route saved and loaded again,
    has other memory) and their version counters (inference tensors count none)."""
    ptrs = (a.data_ptr(), b.data_ptr(), c.data_ptr())
    try:
        return ptrs, (a._version, b._version, c._version)
    except RuntimeError:
        return ptrs, None


def mark_route(sorted_pairs: Tensor, expert_offsets: Tensor, pair_pos: Tensor) -> None:
    """Mark three tensors as one valid route: ``moe_route``'s outputs, or a route the experts
    ops checked. The mark is a Python attribute, so it stays with the tensor objects, which
    torch hands on unchanged through autograd's saved tensors and the compiled graphs."""
    mark = (_NONCE, next(_SERIALS), _state(sorted_pairs, expert_offsets, pair_pos))
    for t in (sorted_pairs, expert_offsets, pair_pos):
        setattr(t, _MARK, mark)


def is_marked_route(sorted_pairs: Tensor, expert_offsets: Tensor, pair_pos: Tensor) -> bool:
    """Whether the three tensors are one route marked in this process, none of them written in
    place since (inference tensors count no versions: a write to one under inference_mode goes
    unseen, as does one through ``.data`` or numpy, which bump no version)."""
    mark = getattr(sorted_pairs, _MARK, None)
    return mark is not None and mark[0] == _NONCE and getattr(expert_offsets, _MARK, None) == mark \
        and getattr(pair_pos, _MARK, None) == mark and mark[2] == _state(sorted_pairs, expert_offsets, pair_pos)


@torch.library.custom_op("blazec::moe_route", mutates_args=(), schema=ROUTE_SCHEMA)
def _moe_route_op(
    topk_ids: Tensor, num_experts: int, capacity: int = -1, priority: str = "token"
) -> tuple[Tensor, Tensor, Tensor]:
    check_route_args(topk_ids, num_experts, capacity, priority)
    impl = get_impl("moe_route", topk_ids.device.type)
    if not getattr(impl, "CHECKS_ID_RANGE", False):
        check_ids_in_range(topk_ids, num_experts)
    route = impl(topk_ids, num_experts, capacity, priority)
    mark_route(*route)
    return route


@_moe_route_op.register_fake
def _moe_route_fake(
    topk_ids: Tensor, num_experts: int, capacity: int = -1, priority: str = "token"
) -> tuple[Tensor, Tensor, Tensor]:
    check_route_args(topk_ids, num_experts, capacity, priority)
    P = topk_ids.shape[0] * topk_ids.shape[1]
    return (
        topk_ids.new_empty((P,), dtype=torch.int64),
        topk_ids.new_empty((num_experts + 1,), dtype=torch.int64),
        topk_ids.new_empty((P,), dtype=torch.int64),
    )


@torch.library.custom_op("blazec::moe_route_sink", mutates_args=())
def _moe_route_sink_op(topk_ids: Tensor, num_experts: int, priority: str = "token") -> tuple[Tensor, Tensor, Tensor]:
    """``moe_route`` where id ``num_experts`` is a sink: its pairs are dropped, exactly as
    ``moe_route`` marks dropped pairs (-1 in both maps, after the kept ones). Expert
    parallelism routes the slots a rank receives for other ranks' experts this way, and GShard's
    rewrite the kept pairs of weight exactly 0. One op rather than ``moe_route`` plus aten ops,
    so that its outputs carry the mark of a valid route (``mark_route``)."""
    sorted_pairs, offsets, pair_pos = torch.ops.blazec.moe_route(topk_ids, num_experts + 1, -1, priority)
    offsets = offsets[: num_experts + 1].clone()
    kept = offsets[num_experts]
    pos = torch.arange(sorted_pairs.shape[0], device=sorted_pairs.device)
    sorted_pairs = torch.where(pos < kept, sorted_pairs, -1)
    pair_pos = torch.where(pair_pos < kept, pair_pos, -1)
    mark_route(sorted_pairs, offsets, pair_pos)
    return sorted_pairs, offsets, pair_pos


@_moe_route_sink_op.register_fake
def _moe_route_sink_fake(topk_ids: Tensor, num_experts: int, priority: str = "token") -> tuple[Tensor, Tensor, Tensor]:
    check_route_args(topk_ids, num_experts + 1, -1, priority)
    P = topk_ids.shape[0] * topk_ids.shape[1]
    return (topk_ids.new_empty((P,), dtype=torch.int64), topk_ids.new_empty((num_experts + 1,), dtype=torch.int64),
            topk_ids.new_empty((P,), dtype=torch.int64))


def moe_route(
    topk_ids: Tensor, num_experts: int, capacity: int = -1, priority: str = "token"
) -> tuple[Tensor, Tensor, Tensor]:
    """Route pairs to experts; returns ``(sorted_pairs, expert_offsets, pair_pos)``.

    See the module docstring for the exact semantics. Thin wrapper over
    ``torch.ops.blazec.moe_route``.
    """
    # numpy ints pass; a bool does not (the op's int schema would take True as 1)
    num_experts, capacity = as_int(num_experts, "moe_route: num_experts"), as_int(capacity, "moe_route: capacity")
    return torch.ops.blazec.moe_route(topk_ids, num_experts, capacity, priority)
