"""``blazec::moe_experts`` and its backward op: the expert MLPs over index-routed pairs.

Schemas (the contract between the MoE passes and the kernels)::

    blazec::moe_experts(Tensor x, Tensor topk_weights, Tensor sorted_pairs,
        Tensor expert_offsets, Tensor pair_pos, Tensor[] w_gate, Tensor[] w_up,
        Tensor[] w_down, Tensor[] b_gate, Tensor[] b_up, Tensor[] b_down, str activation,
        str weight_pos="output", bool recompute=False, ScalarType? out_dtype=None)
        -> (Tensor y, Tensor preact)

    blazec::moe_experts_backward(Tensor grad_y, Tensor x, Tensor topk_weights,
        Tensor sorted_pairs, Tensor expert_offsets, Tensor pair_pos, Tensor[] w_gate,
        Tensor[] w_up, Tensor[] w_down, Tensor[] b_gate, Tensor[] b_up, Tensor[] b_down,
        Tensor preact, str activation, str weight_pos, bool recompute,
        bool overwrite_preact=False)
        -> (Tensor dx, Tensor d_topk_weights, Tensor[] dw_gate, Tensor[] dw_up,
            Tensor[] dw_down, Tensor[] db_gate, Tensor[] db_up, Tensor[] db_down)

Each gradient list of the backward op holds one stacked tensor, ``[E, out, in]`` for weights
and ``[E, out]`` for biases, whether the input list was one stacked tensor or E per-expert
tensors (empty for an empty list); the autograd formula unbinds it into per-expert views for
per-expert lists. One stacked buffer instead of E tensors saves the host E allocations, E
pytree leaves through the custom op, and a fresh pointer table (an H2D copy) per list.

The math is in ``reference.moe_experts_fwd`` / ``reference.moe_experts_bwd`` (the backward is
derived in the latter's docstring). This file holds validation, the fake implementations, the
autograd registration and the user wrapper.

``preact`` is an internal output: the first-GEMM pre-activations in sorted order (gate then up
for gated activations), returned only so that autograd (and the checkpoint solver, which sees
it in the joint graph) can save it. It is marked non-differentiable; gradients flowing into it
are ignored. With ``recompute=True`` it is an empty ``[0]`` tensor and the backward recomputes
the first GEMM from x.

``overwrite_preact=True`` tells the backward that its caller will not read ``preact`` again,
so the kernels may write dg | du over it instead of allocating a second ``[S, n_in]`` buffer
(at the backward's peak, both would be live with every weight gradient). The autograd formula
passes it; the kernels take it up only when the running autograd graph task does not keep the
graph (``retain_graph`` / ``create_graph`` false), since a kept graph's next backward reads the
saved preact again. Then they also release preact's memory (its storage resized to zero bytes)
once the last kernel that reads dg | du is launched, so that it is not live with the last
weight gradient. So a caller of ``torch.ops.blazec.moe_experts`` under autograd must not read
the ``preact`` it returns once the backward has run, nor hand it to other autograd code
whose backward would: it would read dg | du, and after the release a zero-byte storage,
which crashes the process (a segfault on the CPU) rather than raising. ``moe_experts`` (the
wrapper below) and the rewritten graphs never return it. Direct callers of the backward op
keep the default False.

The route (``sorted_pairs``, ``expert_offsets``, ``pair_pos``) must be one ``moe_route``
(or ``moe_route_sink``) call's outputs, which carry a mark (``route.mark_route``) that costs a
few microseconds to read. The forward op checks any other route's contents on the host first
(one sync, then it is marked too), because the kernels trust a route: one that is not one read
out of bounds or gave a wrong y. The backward op and either op under CUDA graph capture check
an unmarked route on a GPU with device-side asserts instead (no sync:
``reference.assert_route_async``): the backward gets unmarked copies of the forward's route
when a saved-tensor hook copies what autograd saves (activation offloading).

What the backward saves: x, topk_weights, sorted_pairs, expert_offsets, pair_pos, the weight and
bias tensors as passed (parameters or views of them), and preact. Nothing else of size T*k*d or
T*k*I: the gathered rows of x, the activated hidden h and the expert outputs are recomputed.
"""

import operator
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from blazec.ops._registry import get_impl
from blazec.ops.activations import ACTIVATIONS, is_gated
from blazec.ops.reference import assert_route_async, check_route_contents, is_stacked, stacked_grad_shape
from blazec.ops.route import is_marked_route, mark_route

WEIGHT_POSITIONS: tuple[str, ...] = ("output", "hidden")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

EXPERTS_SCHEMA = (
    "(Tensor x, Tensor topk_weights, Tensor sorted_pairs, Tensor expert_offsets, "
    "Tensor pair_pos, Tensor[] w_gate, Tensor[] w_up, Tensor[] w_down, Tensor[] b_gate, "
    "Tensor[] b_up, Tensor[] b_down, str activation, str weight_pos=\"output\", "
    "bool recompute=False, ScalarType? out_dtype=None) -> (Tensor y, Tensor preact)"
)
EXPERTS_BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor topk_weights, Tensor sorted_pairs, "
    "Tensor expert_offsets, Tensor pair_pos, Tensor[] w_gate, Tensor[] w_up, "
    "Tensor[] w_down, Tensor[] b_gate, Tensor[] b_up, Tensor[] b_down, Tensor preact, "
    "str activation, str weight_pos, bool recompute, bool overwrite_preact=False) -> "
    "(Tensor dx, Tensor d_topk_weights, "
    "Tensor[] dw_gate, Tensor[] dw_up, Tensor[] dw_down, Tensor[] db_gate, Tensor[] db_up, "
    "Tensor[] db_down)"
)

# ----------------------------------------------------------------------------------------------
# Validation (metadata only, so the fake implementations run it too)
# ----------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_weight_list(
    name: str, ws: Sequence[Tensor], E: int, out: int, inn: int, x: Tensor
) -> None:
    if is_stacked(ws, 2):
        if _shape(ws[0]) != (E, out, inn):
            raise ValueError(
                f"moe_experts: {name}[0] (stacked) must have shape [E, out, in] = "
                f"{[E, out, inn]}, got {list(ws[0].shape)}"
            )
    elif len(ws) == E:
        want = (out, inn)
        if _uniform(ws, want, x):  # the common case (runs every call)
            return
        for i, w in enumerate(ws):
            if w.dim() != 2 or _shape(w) != want:
                raise ValueError(
                    f"moe_experts: {name}[{i}] must have shape [out, in] = {[out, inn]}, "
                    f"got {list(w.shape)}"
                )
    else:
        raise ValueError(
            f"moe_experts: {name} must hold E={E} 2-D [out, in] tensors or one 3-D "
            f"[E, out, in] tensor; got {len(ws)} tensor(s) of dims {[w.dim() for w in ws]}"
        )
    _check_weight_dtypes(name, ws, x)


def _check_bias_list(name: str, bs: Sequence[Tensor], E: int, out: int, x: Tensor) -> None:
    if len(bs) == 0:
        return
    if is_stacked(bs, 1):
        if _shape(bs[0]) != (E, out):
            raise ValueError(
                f"moe_experts: {name}[0] (stacked) must have shape [E, out] = {[E, out]}, "
                f"got {list(bs[0].shape)}"
            )
    elif len(bs) == E:
        if _uniform(bs, (out,), x):
            return
        for i, b in enumerate(bs):
            if _shape(b) != (out,):
                raise ValueError(
                    f"moe_experts: {name}[{i}] must have shape [out] = {[out]}, "
                    f"got {list(b.shape)}"
                )
    else:
        raise ValueError(
            f"moe_experts: {name} must be empty, hold E={E} 1-D [out] tensors or one 2-D "
            f"[E, out] tensor; got {len(bs)} tensor(s) of dims {[b.dim() for b in bs]}"
        )
    _check_weight_dtypes(name, bs, x)


_SHAPE, _DTYPE, _DEVICE = (operator.attrgetter(a) for a in ("shape", "dtype", "device"))


def _uniform(ts: Sequence[Tensor], shape: tuple, x: Tensor) -> bool:
    """Whether every tensor of a per-expert list has ``shape`` and x's dtype and device.

    This runs on every call, on E tensors per list (192 for olmoe-like's three lists), on the
    host path the GPU waits for before GEMM 1: one C-level pass per attribute (``map``) costs
    about a third of a Python loop comparing each tensor. False sends the caller to its loop,
    which names the first tensor that differs; so do symbolic sizes, which do not hash."""
    try:
        return (set(map(_SHAPE, ts)) == {shape} and set(map(_DTYPE, ts)) == {x.dtype}
                and set(map(_DEVICE, ts)) == {x.device})
    except TypeError:  # an unhashable (symbolic) size
        return False


def _check_weight_dtypes(name: str, ts: Sequence[Tensor], x: Tensor) -> None:
    dtype, device = x.dtype, x.device
    if all(t.dtype == dtype and t.device == device for t in ts):
        return
    for i, t in enumerate(ts):
        if t.dtype != x.dtype:
            raise ValueError(
                f"moe_experts: {name}[{i}] has dtype {t.dtype} but x has {x.dtype}; expert "
                f"weights and biases must have x's dtype"
            )
        if t.device != x.device:
            raise ValueError(f"moe_experts: {name}[{i}] is on {t.device} but x is on {x.device}")


def check_experts_args(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: Sequence[Tensor],
    w_up: Sequence[Tensor],
    w_down: Sequence[Tensor],
    b_gate: Sequence[Tensor],
    b_up: Sequence[Tensor],
    b_down: Sequence[Tensor],
    activation: str,
    weight_pos: str,
    out_dtype: Optional[torch.dtype],
) -> int:
    """Validate the arguments of moe_experts; returns the width of ``preact`` (2I or I)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"moe_experts: unknown activation {activation!r}; expected one of {ACTIVATIONS}"
        )
    if weight_pos not in WEIGHT_POSITIONS:
        raise ValueError(
            f"moe_experts: weight_pos must be one of {WEIGHT_POSITIONS}, got {weight_pos!r}"
        )
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be 2-D [T, d], got shape {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"moe_experts: x has unsupported dtype {x.dtype}; expected one of {FLOAT_DTYPES}")
    T, d = x.shape
    if topk_weights.dim() != 2 or topk_weights.shape[0] != T:
        raise ValueError(
            f"moe_experts: topk_weights must have shape [T, k] with T={T} (from x), got "
            f"{list(topk_weights.shape)}"
        )
    if topk_weights.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"moe_experts: topk_weights has unsupported dtype {topk_weights.dtype}; expected "
            f"one of {FLOAT_DTYPES}"
        )
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"moe_experts: unsupported out_dtype {out_dtype}; expected one of {FLOAT_DTYPES}")
    k = topk_weights.shape[1]
    if k == 0:
        raise ValueError("moe_experts: topk_weights has shape [T, 0]: every token needs k >= 1 routed experts")
    P = T * k
    for name, t in (("sorted_pairs", sorted_pairs), ("pair_pos", pair_pos)):
        if t.dim() != 1 or t.shape[0] != P:
            raise ValueError(
                f"moe_experts: {name} must have shape [T*k] = [{P}] (T={T}, k={k}), got "
                f"{list(t.shape)}"
            )
    if expert_offsets.dim() != 1 or expert_offsets.shape[0] < 2:
        raise ValueError(
            f"moe_experts: expert_offsets must be 1-D [E+1] with E >= 1, got shape "
            f"{list(expert_offsets.shape)}"
        )
    for name, t in (
        ("sorted_pairs", sorted_pairs),
        ("expert_offsets", expert_offsets),
        ("pair_pos", pair_pos),
    ):
        if t.dtype != torch.int64:
            raise ValueError(f"moe_experts: {name} must be int64 (as moe_route returns), got {t.dtype}")
    for name, t in (
        ("topk_weights", topk_weights),
        ("sorted_pairs", sorted_pairs),
        ("expert_offsets", expert_offsets),
        ("pair_pos", pair_pos),
    ):
        if t.device != x.device:
            raise ValueError(f"moe_experts: {name} is on {t.device} but x is on {x.device}")
    E = expert_offsets.shape[0] - 1

    if len(w_gate) == 0:
        raise ValueError("moe_experts: w_gate is empty; it must hold the first-GEMM weights")
    if w_gate[0].dim() not in (2, 3):
        raise ValueError(f"moe_experts: w_gate must hold E 2-D [I, d] tensors or one 3-D [E, I, d] tensor; "
                         f"w_gate[0] has shape {list(w_gate[0].shape)}")
    I = w_gate[0].shape[-2]
    gated = is_gated(activation)
    if gated and len(w_up) == 0:
        raise ValueError(f"moe_experts: activation {activation!r} is gated and needs w_up")
    if not gated and len(w_up) != 0:
        raise ValueError(f"moe_experts: activation {activation!r} is not gated; w_up must be empty")
    if not gated and len(b_up) != 0:
        raise ValueError(f"moe_experts: activation {activation!r} is not gated; b_up must be empty")
    _check_weight_list("w_gate", w_gate, E, I, d, x)
    if gated:
        _check_weight_list("w_up", w_up, E, I, d, x)
    _check_weight_list("w_down", w_down, E, d, I, x)
    _check_bias_list("b_gate", b_gate, E, I, x)
    _check_bias_list("b_up", b_up, E, I, x)
    _check_bias_list("b_down", b_down, E, d, x)
    return 2 * I if gated else I


# ----------------------------------------------------------------------------------------------
# Forward op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("blazec::moe_experts", mutates_args=(), schema=EXPERTS_SCHEMA)
def _moe_experts_op(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: list[Tensor],
    w_up: list[Tensor],
    w_down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    activation: str,
    weight_pos: str = "output",
    recompute: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    check_experts_args(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, activation, weight_pos, out_dtype,
    )
    _check_route(sorted_pairs, expert_offsets, pair_pos, "moe_experts")
    impl = get_impl("moe_experts", x.device.type)
    return impl(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, activation, weight_pos, recompute, out_dtype,
    )


_ROUTE_CHECK_WARNED: list = []  # one warning per process: a GPU route check is a sync


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_route(sorted_pairs: Tensor, expert_offsets: Tensor, pair_pos: Tensor, op: str) -> None:
    """A route ``moe_route`` did not build (or one written in place since) is checked once
    before any implementation reads it, on the host (on a GPU, in the backward op and under
    CUDA graph capture: on the device): the kernels trust a route's contents, and a hand-built
    one that is not a route read out of bounds (NaN, or a crash) or gave a wrong y.
    ``moe_route``'s own outputs carry a mark, read in a few microseconds."""
    if is_marked_route(sorted_pairs, expert_offsets, pair_pos):
        return
    if sorted_pairs.device.type != "cpu" and (op == "moe_experts_backward" or _capturing(sorted_pairs)):
        # The backward's route came from a forward, which checked it; it arrives unmarked when
        # a saved-tensor hook (activation offloading) hands back copies. No sync for it, nor
        # under CUDA graph capture: the check runs on the device.
        assert_route_async(sorted_pairs, expert_offsets, pair_pos)
        mark_route(sorted_pairs, expert_offsets, pair_pos)
        return
    if sorted_pairs.device.type != "cpu" and not _ROUTE_CHECK_WARNED:
        _ROUTE_CHECK_WARNED.append(True)
        warnings.warn(f"{op}: checking a route that moe_route did not build (or that was written in place since) "
                      "costs a host sync; routes from moe_route are not checked", stacklevel=3)
    check_route_contents(sorted_pairs, expert_offsets.tolist(), pair_pos)
    mark_route(sorted_pairs, expert_offsets, pair_pos)


@_moe_experts_op.register_fake
def _moe_experts_fake(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: list[Tensor],
    w_up: list[Tensor],
    w_down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    activation: str,
    weight_pos: str = "output",
    recompute: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    n_in = check_experts_args(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, activation, weight_pos, out_dtype,
    )
    y = x.new_empty(x.shape, dtype=out_dtype if out_dtype is not None else x.dtype)
    preact = x.new_empty((0,)) if recompute else x.new_empty((sorted_pairs.shape[0], n_in))
    return y, preact


# ----------------------------------------------------------------------------------------------
# Backward op
# ----------------------------------------------------------------------------------------------


def _check_backward_args(
    grad_y: Tensor, x: Tensor, preact: Tensor, sorted_pairs: Tensor, n_in: int, recompute: bool
) -> None:
    if _shape(grad_y) != _shape(x):
        raise ValueError(
            f"moe_experts_backward: grad_y must have x's shape {list(x.shape)}, got "
            f"{list(grad_y.shape)}"
        )
    expected = (0,) if recompute else (sorted_pairs.shape[0], n_in)
    if _shape(preact) != expected:
        raise ValueError(
            f"moe_experts_backward: preact must have shape {list(expected)} "
            f"(recompute={recompute}), got {list(preact.shape)}"
        )
    if preact.dtype != x.dtype:
        raise ValueError(f"moe_experts_backward: preact has dtype {preact.dtype}, x has {x.dtype}")
    if not grad_y.dtype.is_floating_point:
        raise ValueError(f"moe_experts_backward: grad_y must be a floating-point tensor, got {grad_y.dtype}")
    for name, t in (("grad_y", grad_y), ("preact", preact)):
        if t.device != x.device:
            raise ValueError(f"moe_experts_backward: {name} is on {t.device} but x is on {x.device}")


@torch.library.custom_op(
    "blazec::moe_experts_backward", mutates_args=(), schema=EXPERTS_BACKWARD_SCHEMA
)
def _moe_experts_backward_op(
    grad_y: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: list[Tensor],
    w_up: list[Tensor],
    w_down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    preact: Tensor,
    activation: str,
    weight_pos: str,
    recompute: bool,
    overwrite_preact: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    n_in = check_experts_args(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, activation, weight_pos, None,
    )
    _check_backward_args(grad_y, x, preact, sorted_pairs, n_in, recompute)
    _check_route(sorted_pairs, expert_offsets, pair_pos, "moe_experts_backward")
    impl = get_impl("moe_experts_backward", x.device.type)
    return impl(
        grad_y, x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, preact, activation, weight_pos, recompute, overwrite_preact,
    )


@_moe_experts_backward_op.register_fake
def _moe_experts_backward_fake(
    grad_y: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: list[Tensor],
    w_up: list[Tensor],
    w_down: list[Tensor],
    b_gate: list[Tensor],
    b_up: list[Tensor],
    b_down: list[Tensor],
    preact: Tensor,
    activation: str,
    weight_pos: str,
    recompute: bool,
    overwrite_preact: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    n_in = check_experts_args(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
        b_gate, b_up, b_down, activation, weight_pos, None,
    )
    _check_backward_args(grad_y, x, preact, sorted_pairs, n_in, recompute)

    # Each list's gradient is one contiguous stacked tensor (the reference allocates it that
    # way too), whatever the layout and strides of the weights passed in.
    def like(ts: Sequence[Tensor], ndim_expert: int) -> list[Tensor]:
        return [ts[0].new_empty(stacked_grad_shape(ts, ndim_expert))] if ts else []

    return (
        x.new_empty(x.shape),
        topk_weights.new_empty(topk_weights.shape),
        like(w_gate, 2), like(w_up, 2), like(w_down, 2), like(b_gate, 1), like(b_up, 1), like(b_down, 1),
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "blazec::moe_experts_backward has no derivative: double backward through "
        "blazec::moe_experts is not supported"
    )


_moe_experts_backward_op.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# Autograd of the forward op
# ----------------------------------------------------------------------------------------------

_LISTS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def _setup_context(ctx, inputs, output) -> None:
    (x, topk_weights, sorted_pairs, expert_offsets, pair_pos, *lists, activation, weight_pos,
     recompute, _out_dtype) = inputs
    _y, preact = output
    # preact exists only to be saved; it has no gradient of its own.
    ctx.mark_non_differentiable(preact)
    ctx.list_lens = tuple(len(lst) for lst in lists)
    ctx.activation = activation
    ctx.weight_pos = weight_pos
    ctx.recompute = recompute
    # The full saved set: inputs, parameters and preact. Nothing of size T*k*d or T*k*I except
    # preact (and with recompute=True, preact is empty).
    flat = [t for lst in lists for t in lst]
    ctx.save_for_backward(x, topk_weights, sorted_pairs, expert_offsets, pair_pos, preact, *flat)


def _backward(ctx, grad_y: Tensor, _grad_preact: Optional[Tensor]):
    x, topk_weights, sorted_pairs, expert_offsets, pair_pos, preact, *flat = ctx.saved_tensors
    lists: list[list[Tensor]] = []
    i = 0
    for n in ctx.list_lens:
        lists.append(list(flat[i : i + n]))
        i += n
    dx, d_tw, *stacked = torch.ops.blazec.moe_experts_backward(
        grad_y, x, topk_weights, sorted_pairs, expert_offsets, pair_pos, *lists, preact,
        ctx.activation, ctx.weight_pos, ctx.recompute, True,  # preact is read only here
    )
    # One stacked gradient per list; per-expert lists get per-expert views of it.
    grads = [
        g if is_stacked(lst, nd) else list(g[0].unbind(0)) if lst else []
        for g, lst, nd in zip(stacked, lists, (2, 2, 2, 1, 1, 1))
    ]
    full = (dx, d_tw, None, None, None, *grads, None, None, None, None)
    # The dispatcher drops trailing arguments equal to their defaults before autograd sees
    # them, and the returned structure must match the arguments actually passed.
    # needs_input_grad has exactly one entry per passed argument.
    return full[: len(ctx.needs_input_grad)]


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# User wrapper
# ----------------------------------------------------------------------------------------------

TensorList = Union[Tensor, Sequence[Tensor], None]


def _as_list(ts: TensorList) -> list[Tensor]:
    # Convenience for callers: None means "no tensors", a bare 3-D/2-D tensor means stacked.
    if ts is None:
        return []
    if isinstance(ts, Tensor):
        return [ts]
    return list(ts)


def moe_experts(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: TensorList,
    w_up: TensorList,
    w_down: TensorList,
    b_gate: TensorList,
    b_up: TensorList,
    b_down: TensorList,
    activation: str,
    weight_pos: str = "output",
    recompute: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The MoE expert layer over routed pairs; returns y [T, d] (``preact`` is internal).

    Weight/bias arguments take a list of per-expert tensors, one stacked tensor (or a
    one-element list of it), or None for "none". See the module docstring for the semantics.
    """
    y, _preact = torch.ops.blazec.moe_experts(
        x, topk_weights, sorted_pairs, expert_offsets, pair_pos,
        _as_list(w_gate), _as_list(w_up), _as_list(w_down),
        _as_list(b_gate), _as_list(b_up), _as_list(b_down),
        activation, weight_pos, recompute, out_dtype,
    )
    return y
