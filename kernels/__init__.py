"""Triton kernels of blazec, installed as ``blazec.kernels``; one file per kernel family.

Nothing is imported here on purpose: ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel
is defined, and CPU users of blazec should never import Triton. ``blazec.ops._registry``
imports ``blazec.kernels.moe_experts`` lazily on the first CUDA call. See docs/KERNELS.md.

- ``moe_route``: routing index build (counts, prefix scan, stable scatter)
- ``moe_grouped_gemm``: gather-GEMM-activation, down GEMM / dX GEMM / dh GEMM, backward
  through the activation (split: an elementwise epilogue; or fused into the dh GEMM)
- ``moe_wgrad``: grouped weight and bias gradients
- ``wgrad_grouped_mm``: weight gradients through torch's grouped GEMM on sorted row copies
  (the default on Hopper in bf16; ``BLAZEC_WGRAD``)
- ``moe_combine``: deterministic slot-ordered combines and d(routing weights)
- ``moe_experts``: launchers with the reference signatures, fallback, registration
"""
