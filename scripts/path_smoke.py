"""Run one launch path of the blaze MoE kernels on a small problem on the GPU, forced, and
compare it with the default paths: the GPU script's guard against a path that fails in a way
the timed choice's own check cannot catch (a fault that ends the process).

    python scripts/path_smoke.py tma        # any of PATHS

Exit status 0: the path ran (forward and backward, stacked and per-expert weights) and agreed
with the default paths within bf16 tolerance; 1: it ran and disagreed; 2: bad usage or no CUDA
device; anything else (a crash): it failed. ``scripts/gpu_check.sh`` leaves a path whose run
did not exit 0 out of the bench (``BLAZEC_AUTO_EXCLUDE``, and its forced row).
"""

from __future__ import annotations

import math
import os
import sys

# What forces each path (the other switches at their former defaults); "default" is those.
DEFAULT = {"BLAZEC_GEMM1": "fused", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "two"}
PATHS = {
    "wide": {"BLAZEC_GEMM1": "wide"},
    "tma": {"BLAZEC_GEMM1": "tma"},
    "split": {"BLAZEC_GEMM1": "split"},
    "persistent": {"BLAZEC_ROWS": "persistent"},
    "cat": {"BLAZEC_DX": "cat"},
    "cat-persistent": {"BLAZEC_DX": "cat", "BLAZEC_ROWS": "persistent"},
}


def run(env: dict, stacked: bool, device: str = "cuda"):
    """Forward and backward of one small bf16 SwiGLU MoE layer (T=512, d=256, I=512, E=8, k=2:
    every path applies) with the launch switches in ``env``, on stacked or per-expert weights;
    the output and every gradient, as fp32."""
    import torch

    from blazec.ops import moe_experts, moe_route

    os.environ.update(env)
    g = torch.Generator(device=device).manual_seed(0)
    T, d, I, E, k = 512, 256, 512, 8, 2
    bf = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(bf).requires_grad_()

    x = rnd(T, d)
    shapes = [((I, d), d ** -0.5), ((I, d), d ** -0.5), ((d, I), I ** -0.5)]
    if stacked:
        ws = [rnd(E, *shape, scale=s) for shape, s in shapes]
        leaves = ws
    else:
        ws = [[rnd(*shape, scale=s) for _ in range(E)] for shape, s in shapes]
        leaves = [w for ls in ws for w in ls]
    tw, ids = torch.topk(torch.randn(T, E, generator=g, device=device).softmax(-1), k)
    tw = tw.to(bf).requires_grad_()
    sp, eo, pp = moe_route(ids, E)
    y = moe_experts(x, tw, sp, eo, pp, *ws, None, None, None, "swiglu")
    y.float().pow(2).mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return [y.detach().float(), x.grad.float(), tw.grad.float(), *(w.grad.float() for w in leaves)]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PATHS:
        print(f"usage: python scripts/path_smoke.py PATH, with PATH one of {', '.join(PATHS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("path_smoke: needs a CUDA device", file=sys.stderr)
        return 2
    path = argv[0]
    worst = 0.0
    for stacked in (True, False):
        got = run({**DEFAULT, **PATHS[path]}, stacked)
        want = run(DEFAULT, stacked)
        for a, b in zip(got, want):
            diff = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            worst = max(worst, diff if math.isfinite(diff) else math.inf)  # (max() drops a NaN)
    ok = worst <= 2e-2
    print(f"path_smoke {path}: ran; largest difference from the default paths {worst:.1e} of the "
          f"largest value ({'agrees' if ok else 'DISAGREES'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
