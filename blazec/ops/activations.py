"""The expert activations of ``blazec::moe_experts``: names, forward and backward.

One table of names that the op validation, the reference and (later) the Triton kernels share,
so that adding an activation is one edit here. The backward uses ATen's own activation
backward ops (``silu_backward``, ``gelu_backward``, ``threshold_backward``), so gradients match
eager autograd bit for bit in every dtype, including the fp32 internal math those ops use for
bf16/fp16. The formulas they compute are written out in ``hidden_backward``'s docstring.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Gated activations: h = base(g) * u, where g comes from w_gate and u from w_up.
GATED_ACTIVATIONS: dict[str, str] = {
    "swiglu": "silu",
    "geglu": "gelu",
    "geglu_tanh": "gelu_tanh",
}
# Plain activations: h = act(g); w_up must be empty.
PLAIN_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu", "silu")
ACTIVATIONS: tuple[str, ...] = (*GATED_ACTIVATIONS, *PLAIN_ACTIVATIONS)


def is_gated(activation: str) -> bool:
    """Whether ``activation`` multiplies by a second (up) projection."""
    return activation in GATED_ACTIVATIONS


def _base(activation: str) -> str:
    return GATED_ACTIVATIONS.get(activation, activation)


def base_forward(base: str, g: Tensor) -> Tensor:
    """The element-wise activation ``base`` in {"silu", "gelu", "gelu_tanh", "relu"}."""
    if base == "silu":
        return F.silu(g)
    if base == "gelu":
        return F.gelu(g)
    if base == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if base == "relu":
        return F.relu(g)
    raise ValueError(f"unknown base activation {base!r}")


def base_backward(base: str, grad: Tensor, g: Tensor) -> Tensor:
    """``grad * base'(g)``, computed by the same ATen kernels eager autograd uses."""
    if base == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    if base == "gelu":
        return torch.ops.aten.gelu_backward(grad, g, approximate="none")
    if base == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")
    if base == "relu":
        # relu'(g) = 1 where g > 0 (0 at g == 0, as in eager, which thresholds the output).
        return torch.ops.aten.threshold_backward(grad, g, 0)
    raise ValueError(f"unknown base activation {base!r}")


def hidden_forward(activation: str, g: Tensor, u: Optional[Tensor]) -> Tensor:
    """The expert hidden state h from the first-GEMM pre-activations g (and u when gated)."""
    a = base_forward(_base(activation), g)
    if is_gated(activation):
        assert u is not None
        return a * u
    return a


def hidden_backward(
    activation: str, dh: Tensor, g: Tensor, u: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of the pre-activations (dg, du) from dh; du is None for plain activations.

    Plain: h = a(g), so dg = dh * a'(g). Gated: h = a(g) * u, so dg = (dh * u) * a'(g) and
    du = dh * a(g). With s = sigmoid(g), Phi/phi the standard normal cdf/pdf,
    c = sqrt(2/pi) and z = c * (g + 0.044715 g^3):

        silu'(g)      = s * (1 + g * (1 - s))
        gelu'(g)      = Phi(g) + g * phi(g)                                  (exact, erf)
        gelu_tanh'(g) = 0.5 * (1 + tanh z) + 0.5 * g * (1 - tanh^2 z) * c * (1 + 3 * 0.044715 g^2)
        relu'(g)      = 1 if g > 0 else 0
    """
    base = _base(activation)
    if is_gated(activation):
        assert u is not None
        a = base_forward(base, g)
        du = dh * a
        dg = base_backward(base, dh * u, g)
        return dg, du
    return base_backward(base, dh, g), None
