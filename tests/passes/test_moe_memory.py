"""What a rewritten MoE layer keeps for backward, measured on the CPU with saved_tensors_hooks.

The naive loop keeps, per expert, the gathered rows, both first-GEMM outputs, the activated
hidden and the expert output (several [T*k, d] and [T*k, I] buffers); blaze keeps the
first-GEMM pre-activations ([T*k, 2I]) and the routing indices. The measurement does not
depend on the device (blazec.memory counts the storages autograd saves).
"""

from __future__ import annotations

import torch

from blazec import report
from blazec.memory import model_tensors, saved_for_backward
from tests.helpers import loss_of
from tests.passes.models import Cfg, LoopMoE, compile_blaze, moe_report

# benchmarks/saved_bytes.py measures T=4096, E=64 (docs/BENCHMARKS.md: 0.210 for this form);
# 16 experts trace a quarter of the loop, and the ratio holds (0.206 on 2026-11-28)
T, D, INTER, E, K = 1024, 256, 128, 16, 8


def test_blaze_saves_at_most_30_percent_of_eager_activations():
    torch.manual_seed(0)
    model = LoopMoE(Cfg(d=D, inter=INTER, num_experts=E, top_k=K))
    x = torch.randn(T, D, requires_grad=True)
    keep = model_tensors(model, (x,))

    _, eager = saved_for_backward(lambda: model(x), keep)

    compiled = compile_blaze(model, {"final_stage": "eager"})
    with report.capture() as records:
        loss_of(compiled(x)).backward()  # compile outside the measurement
    (m,) = moe_report(records[0]).matches
    assert (m.details["E"], m.details["k"]) == (E, K)
    out, blaze = saved_for_backward(lambda: compiled(x), keep)
    loss_of(out).backward()  # what was saved is enough for backward

    pairs = T * K
    msg = (f"saved activations at T={T}, d={D}, I={INTER}, E={E}, k={K} fp32: eager {eager.activation_bytes:,d} B "
           f"({eager.activation_tensors} tensors), blaze {blaze.activation_bytes:,d} B "
           f"({blaze.activation_tensors} tensors), ratio {blaze.activation_bytes / eager.activation_bytes:.3f}; "
           f"blaze's largest: {blaze.largest}")
    print("\n" + msg)
    # Sanity: eager keeps at least rows + gate + up + hidden per pair; blaze keeps the pre-activations.
    assert eager.activation_bytes >= pairs * (D + 3 * INTER) * 4, msg
    assert blaze.activation_bytes >= pairs * 2 * INTER * 4, msg
    assert blaze.activation_bytes <= 0.3 * eager.activation_bytes, msg


def test_a_plain_tensor_attribute_is_not_an_activation():
    """``self.scale = torch.randn(...)`` (not a registered buffer) lives with the module, like a
    buffer; saved for backward it was counted as 131,072 B of activations (memory review)."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(256, 256)
            self.scale = torch.randn(128, 256)

        def forward(self, x):
            return self.lin(x) * self.scale

    model, x = Scaled(), torch.randn(128, 256, requires_grad=True)
    _, saved = saved_for_backward(lambda: model(x), model_tensors(model, (x,)))
    assert saved.activation_bytes == 0  # the product saves only x (an input) and scale
