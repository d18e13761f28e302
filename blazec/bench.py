"""``blazec bench``: one MoE SwiGLU layer with its router, forward + backward, side by side.

The protocol of docs/BASELINES.md, in one process, on the same weights and inputs:

- ``eager-loop``: the naive static loop over a ModuleList of experts (torch.where + index_add_)
- ``sort-grouped-mm`` / ``sort-grouped-mm-compile``: argsort + gather + grouped GEMMs, written
  as a user would (``torch._grouped_mm`` for bf16 on CUDA, else a loop over the groups), eager
  and under ``torch.compile``
- ``hf-grouped-mm-compile``: the same under ``torch.compile``, with the expert weights stored as
  Hugging Face v5 stores them (``gate_up_proj`` [E, 2I, d], ``down_proj`` [E, d, I]) and passed
  transposed: torch's grouped GEMM picks its kernel by the operands' layout, and BASELINES.md's
  fastest mixtral-like row is this form
- ``blazec-loop`` / ``blazec-loop-recompute``: the eager-loop model under
  ``torch.compile(backend="blaze")`` (default options, and ``moe_recompute="recompute_gemm1"``)
- ``sort-grouped-mm-compile-cudagraphs`` / ``blazec-loop-cudagraphs``: ``sort-grouped-mm-compile``
  and ``blazec-loop`` with ``mode="reduce-overhead"`` (Inductor's CUDA graph trees: each step
  replays recorded kernels, so the host's per-step launch cost leaves the step's time; on CPU
  the mode compiles as the default does). The pair measures what each path costs with the
  host out of the way (the targets set blazec's against the fastest baseline row, this
  baseline included)
- ``blazec-loop-grouped-mm-wgrad`` / ``blazec-loop-triton-wgrad``: ``blazec-loop`` with its
  weight gradients forced to torch's grouped GEMM or to the Triton kernel (``BLAZEC_WGRAD`` set
  for that row only), to compare the two on the same card in the same run
- ``blazec-loop-split-dh`` / ``blazec-loop-fused-dh``: ``blazec-loop`` with ``BLAZEC_DH=split``
  or ``fused`` for that row (the backward's dh step, docs/KERNELS.md)
- ``blazec-loop-fused-tiles``: ``blazec-loop`` with ``BLAZEC_GEMM1=fused``,
  ``BLAZEC_ROWS=tiles`` and ``BLAZEC_DX=two`` (GEMM 1's two-dot kernel, a program per row-GEMM
  tile, the gated dX's two K loops), forced: ``blazec-loop`` picks these launch paths by
  timing, and this row is what it ran before that
- ``blazec-loop-split-gemm1`` / ``blazec-loop-wide-gemm1`` / ``blazec-loop-tma-gemm1`` /
  ``blazec-loop-persistent-rows`` / ``blazec-loop-cat-dx``: ``blazec-loop-fused-tiles`` with one
  path changed: ``BLAZEC_GEMM1=split`` (GEMM 1 as two row GEMMs and an elementwise activation
  pass), ``BLAZEC_GEMM1=wide`` (one interleaved gate|up weight tile per K step),
  ``BLAZEC_GEMM1=tma`` (GEMM 1's weight tiles through tensor descriptors: TMA on Hopper),
  ``BLAZEC_ROWS=persistent`` (the single-product row GEMMs as persistent kernels) or
  ``BLAZEC_DX=cat`` (the gated dX GEMM as one K loop over dg | du)
- ``blazec-ops`` / ``blazec-ops-recompute``: ``blazec.ops.moe_route`` + ``moe_experts`` called
  directly on stacked weights
- ``dense-equivalent``: not a MoE, the ceiling: one dense SwiGLU MLP (cuBLAS GEMMs) on T*k rows,
  the same GEMM FLOPs with no routing, gather or combine. Its TFLOP/s is the "% dense" column's
  denominator; it has no error columns (it is a different function)

Each row: median wall time of forward + backward of ``out.float().pow(2).mean()`` (CUDA events
on GPU), TFLOP/s of the three expert GEMMs (3*T*k*2*d*3*I FLOPs per step), peak memory above
weights and inputs, memory still held after forward (excluding the output), and the max abs
error of the output, of dL/dx and of the weight gradients (router and the three expert
weights, the largest of the four) against the eager loop, each relative to the largest value.
On CUDA each row's line also gives the median host time to issue a step (its kernels queued):
near the step's time, the step was host-bound (the GPU waited for the host, or the host for
the GPU where the step syncs, as the eager loop's torch.where does). The -cudagraphs rows
report no peak or act on CUDA: their graphs' memory pool is held from the recording step on,
so the counters cannot split it. On CPU, "act" is the bytes autograd saves for backward
(saved-tensor hooks) and "peak" is not measured; CPU timings are not the GPU claim. The GPU
shapes (olmoe-like, mixtral-like) need CUDA. On CPU the rows of ``CPU_SAME_AS`` (each differs
from another row only by a GPU launch path, so there it runs that row's code) are left out
unless ``--impl`` names them. Before any row runs, a shape with more than ``MAX_EXPERTS``
experts, with 2**31 or more (token, expert) pairs, or whose estimated bytes (``bytes_needed``)
exceed the device's memory, is an error (exit status 2). A row that fails (an exception, or
out of memory) is a row of the table with its error as the note; the run then ends with a
one-line summary and exit status 1 (``EXIT_STATUS``).

The first step of each row (compiling, and autotuning each kernel key that no earlier row of
the process has tuned) is not timed, but its results are kept and compared with a later
step's: blazec's kernels are deterministic, so for its rows they must be equal bit for bit
(``first step`` in the row's line; a difference means that autotuning, which runs the kernels
on the step's own buffers, changed a result). Run a row alone (``--impl``) to tune all its keys
in its first step.

Under the table: the BASELINES.md targets checked on this run's rows (``bench_targets.py``),
and with ``--profile`` each row's most expensive kernels in one more step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from blazec import bench_timeline
from blazec.bench_targets import check as check_targets
from blazec.demo_model import SwiGLUExpert

SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "olmoe-like": (16384, 2048, 1024, 64, 8),
    "mixtral-like": (8192, 4096, 14336, 8, 2),
}
CPU_DEFAULT_SHAPE = (256, 64, 96, 8, 2)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = (
    "eager-loop",
    "sort-grouped-mm",
    "sort-grouped-mm-compile",
    "hf-grouped-mm-compile",
    "blazec-loop",
    "blazec-loop-recompute",
    "sort-grouped-mm-compile-cudagraphs",
    "blazec-loop-cudagraphs",
    "blazec-loop-grouped-mm-wgrad",
    "blazec-loop-triton-wgrad",
    "blazec-loop-split-dh",
    "blazec-loop-fused-dh",
    "blazec-loop-split-gemm1",
    "blazec-loop-wide-gemm1",
    "blazec-loop-tma-gemm1",
    "blazec-loop-persistent-rows",
    "blazec-loop-cat-dx",
    "blazec-loop-fused-tiles",
    "blazec-ops",
    "blazec-ops-recompute",
    "dense-equivalent",
)
DENSE = "dense-equivalent"
# Rows that run with an environment variable set for their duration only.
ROW_ENV = {
    "blazec-loop-grouped-mm-wgrad": {"BLAZEC_WGRAD": "grouped_mm"},
    "blazec-loop-triton-wgrad": {"BLAZEC_WGRAD": "triton"},
    "blazec-loop-split-dh": {"BLAZEC_DH": "split"},
    "blazec-loop-fused-dh": {"BLAZEC_DH": "fused"},
    # each the former fixed defaults (fused, tiles, two) with one path changed
    "blazec-loop-split-gemm1": {"BLAZEC_GEMM1": "split", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "two"},
    "blazec-loop-wide-gemm1": {"BLAZEC_GEMM1": "wide", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "two"},
    "blazec-loop-tma-gemm1": {"BLAZEC_GEMM1": "tma", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "two"},
    "blazec-loop-persistent-rows": {"BLAZEC_GEMM1": "fused", "BLAZEC_ROWS": "persistent", "BLAZEC_DX": "two"},
    "blazec-loop-cat-dx": {"BLAZEC_GEMM1": "fused", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "cat"},
    "blazec-loop-fused-tiles": {"BLAZEC_GEMM1": "fused", "BLAZEC_ROWS": "tiles", "BLAZEC_DX": "two"},
}
# On CPU these rows run the same code as the row named: they differ from it only by a GPU launch
# path (a Triton kernel choice, BLAZEC_* above, or CUDA graphs), which does not exist there. The
# CPU run leaves them out unless --impl names them.
CPU_SAME_AS = {
    **{impl: "blazec-loop" for impl in ROW_ENV},
    "sort-grouped-mm-compile-cudagraphs": "sort-grouped-mm-compile",
    "blazec-loop-cudagraphs": "blazec-loop",
}
# The loop model builds one module per expert (three Linears), and Dynamo unrolls its loop once
# per expert into each compiled row's graph (about 20 s to compile E=256 on a 2-core CPU, growing
# with E). MoE layers in use have a few hundred experts (DeepSeek-V3: 256); this leaves room.
MAX_EXPERTS = 4096
GiB = 1024**3


class BenchError(ValueError):
    """A user error of ``blazec bench`` (printed as one line)."""


def _check_writable(path: str) -> None:
    """--json's file must be writable before the rows run (minutes on a GPU), not after."""
    if os.path.isdir(path):
        raise BenchError(f"--json {path}: is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BenchError(f"--json {path}: the directory {parent} does not exist")
    existed = os.path.exists(path)
    try:
        open(path, "a").close()  # what the write will need; an existing file is left as it was
    except OSError as e:
        raise BenchError(f"--json {path}: cannot write it ({e.strerror})") from None
    if not existed:
        os.remove(path)


# ----------------------------------------------------------------------------------------------
# The models, written the way users write them
# ----------------------------------------------------------------------------------------------


def _route(gate: nn.Linear, x: torch.Tensor, top_k: int):
    probs = F.softmax(gate(x), dim=1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


class LoopMoE(nn.Module):
    """Static loop over experts: one_hot mask, torch.where, gather, expert MLP, index_add_."""

    def __init__(self, d: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(d, inter) for _ in range(num_experts))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(probs, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current = self.experts[e](x[top_x]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(x.dtype))
        return final


class SortedMoE(nn.Module):
    """argsort by expert, gather rows, grouped GEMMs on the sorted rows, weight, index_add_.

    ``hf_layout``: the weights stored as Hugging Face v5's ``gate_up_proj`` [E, 2I, d] and
    ``down_proj`` [E, d, I], used through transposed views; else stored [E, d, 2I] / [E, I, d]."""

    def __init__(self, loop: LoopMoE, hf_layout: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.hf_layout = loop.num_experts, loop.top_k, hf_layout
        self.gate = copy.deepcopy(loop.gate)
        ex = loop.experts
        I = ex[0].w1.weight.shape[0]
        gu = torch.stack([torch.cat([m.w1.weight, m.w3.weight], 0) for m in ex])  # [E, 2I, d]
        down = torch.stack([m.w2.weight for m in ex])  # [E, d, I]
        if not hf_layout:
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        self.w_gate_up = nn.Parameter(gu.detach().contiguous())
        self.w_down = nn.Parameter(down.detach().contiguous())
        self.inter = I

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, d, 2I] and [E, I, d]: the right-hand operands of the two grouped GEMMs."""
        if self.hf_layout:
            return self.w_gate_up.transpose(-2, -1), self.w_down.transpose(-2, -1)
        return self.w_gate_up, self.w_down

    def forward(self, x):
        weights, ids = _route(self.gate, x, self.top_k)
        flat = ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        tok = perm // self.top_k
        rows = x[tok]
        counts = torch.histc(flat.float(), bins=self.num_experts, min=0, max=self.num_experts - 1).long()
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w_gate_up, w_down = self.weights()
        if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            gate, up = torch._grouped_mm(rows, w_gate_up, offs=offs).chunk(2, dim=-1)
            out_rows = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offs)
        else:
            outs = []
            for e, chunk in enumerate(torch.split(rows, counts.tolist())):
                gate, up = (chunk @ w_gate_up[e]).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ w_down[e])
            out_rows = torch.cat(outs)
        out_rows = out_rows * weights.reshape(-1)[perm, None]
        return torch.zeros_like(x).index_add_(0, tok, out_rows)


class BlazeOpsMoE(nn.Module):
    """The blaze ops called directly, on 3-D stacked expert weights."""

    def __init__(self, loop: LoopMoE, recompute: bool):
        super().__init__()
        self.num_experts, self.top_k, self.recompute = loop.num_experts, loop.top_k, recompute
        self.gate = copy.deepcopy(loop.gate)
        ex = loop.experts
        self.w_gate = nn.Parameter(torch.stack([m.w1.weight for m in ex]).detach().clone())  # [E, I, d]
        self.w_up = nn.Parameter(torch.stack([m.w3.weight for m in ex]).detach().clone())
        self.w_down = nn.Parameter(torch.stack([m.w2.weight for m in ex]).detach().clone())  # [E, d, I]

    def forward(self, x):
        from blazec.ops import moe_experts, moe_route

        weights, ids = _route(self.gate, x, self.top_k)
        sp, eo, pp = moe_route(ids, self.num_experts)
        return moe_experts(x, weights, sp, eo, pp, self.w_gate, self.w_up, self.w_down, None, None, None,
                           "swiglu", "output", self.recompute)


class DenseEquivalent(nn.Module):
    """Expert 0's SwiGLU MLP on T*k rows (x repeated k times, made once): the expert GEMMs'
    FLOPs as three dense GEMMs forward and six backward, with nothing MoE about them. Each
    token's k output rows are summed, so the loss runs over [T, d] as in the MoE rows (over
    [T*k, d] it added k times their loss work: 5.5 of 13.6 ms at olmoe-like, H100, torch 2.11,
    2026-11-27)."""

    def __init__(self, loop: LoopMoE, x: torch.Tensor):
        super().__init__()
        ex = loop.experts[0]
        self.k = loop.top_k
        self.w1, self.w3, self.w2 = (nn.Parameter(m.weight.detach().clone()) for m in (ex.w1, ex.w3, ex.w2))
        self.rows = nn.Parameter(x.detach().repeat_interleave(loop.top_k, 0))  # gets dL/drows like dx

    def forward(self, x):
        r = self.rows
        out = F.linear(F.silu(F.linear(r, self.w1)) * F.linear(r, self.w3), self.w2)
        return out.view(-1, self.k, out.shape[-1]).sum(1)


def matmul_tflops(dev: torch.device, dtype: torch.dtype, n: int, iters: int = 20) -> float:
    """TFLOP/s of ``torch.mm`` on two ``n x n`` matrices (median of ``iters`` after 3 warm-ups):
    the card's dense GEMM rate in this run, the reference for the rows' TFLOP/s."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    times = [_timed(lambda: torch.mm(a, b), dev)[0] for _ in range(3 + iters)][3:]
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    impl: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    pct_dense: Optional[float] = None  # tflops as a percentage of the dense-equivalent row's
    peak_gib: Optional[float] = None
    act_gib: Optional[float] = None
    err_out: Optional[float] = None
    err_dx: Optional[float] = None
    err_dw: Optional[float] = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _step(model, x):
    if x.is_cuda:  # a new step for CUDA graph trees (the -cudagraphs rows); nothing for the others
        torch.compiler.cudagraph_mark_step_begin()
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


def _time(model, x, dev, warmup: int, iters: int) -> tuple[float, float]:
    """Median step time, and the median host time the step took to issue (from the start event
    until ``_step`` returned, its kernels queued): on CUDA, a host time close to the step's
    says the step was host-bound (the GPU waited for the host, or a sync made the host wait),
    one well below it that it was GPU-bound (the profiled step's idle gaps say where; this says
    whether, without the profiler's own cost)."""
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        x.grad = None
        _step(model, x)
    _sync(dev)
    times, host = [], []
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        x.grad = None
        ms, host_ms = _timed(lambda: _step(model, x), dev)
        times.append(ms)
        host.append(host_ms)
    return statistics.median(times), statistics.median(host)


def _timed(fn: Callable[[], Any], dev: torch.device) -> tuple[float, float]:
    """(ms, host ms) of one call of ``fn``: on CUDA the time between events around it (the
    GPU's), and the time until ``fn`` returned (the host's, its kernels queued); on CPU both
    are the call's wall time."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms


@dataclass
class StepResult:
    """What one step computed: the output, dL/dx and the weight gradients in the loop model's
    layout (``_weight_grads``); dx and dw are None for the dense row."""

    out: torch.Tensor
    dx: Optional[torch.Tensor]
    dw: Optional[dict[str, torch.Tensor]]


def _memory(model, x, dev) -> tuple[Optional[float], float, StepResult]:
    """(peak GiB or None, after-forward GiB, results) of one fresh step."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        torch.compiler.cudagraph_mark_step_begin()
        out = model(x)
        _sync(dev)
        act = torch.cuda.memory_allocated(dev) - base - out.untyped_storage().nbytes()
        out.float().pow(2).mean().backward()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        return peak / GiB, act / GiB, _result(model, x, out)
    from blazec.memory import model_tensors, saved_for_backward

    out, saved = saved_for_backward(lambda: model(x), model_tensors(model, (x,)))
    out.float().pow(2).mean().backward()
    return None, saved.activation_bytes / GiB, _result(model, x, out)


def _result(model, x: torch.Tensor, out: torch.Tensor) -> StepResult:
    # dx None: the dense row does not read x
    # copies: under CUDA graph trees the next step's replay reuses (and poisons) these buffers
    dx = None if x.grad is None else x.grad.detach().clone()
    return StepResult(out.detach().clone(), dx, _weight_grads(model))


def _weight_grads(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The router's and the experts' weight gradients of a bench row, in the loop model's
    layout: ``gate`` [E, d], ``w1`` / ``w3`` [E, I, d], ``w2`` [E, d, I] (None: the dense row)."""
    inner = getattr(model, "m", model)  # blazec-loop's wrapper
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile's module

    def grad(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()

    if isinstance(inner, LoopMoE):
        ex = inner.experts
        return {"gate": grad(inner.gate.weight),
                **{w: torch.stack([grad(getattr(m, w).weight) for m in ex]) for w in ("w1", "w3", "w2")}}
    if isinstance(inner, SortedMoE):
        gu, down, I = grad(inner.w_gate_up), grad(inner.w_down), inner.inter
        if not inner.hf_layout:  # [E, d, 2I], [E, I, d]
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        return {"gate": grad(inner.gate.weight), "w1": gu[:, :I], "w3": gu[:, I:], "w2": down}
    if isinstance(inner, BlazeOpsMoE):
        return {"gate": grad(inner.gate.weight), "w1": grad(inner.w_gate), "w3": grad(inner.w_up),
                "w2": grad(inner.w_down)}
    return None


def _dw_err(dw: Optional[dict[str, torch.Tensor]], ref: Optional[dict[str, torch.Tensor]]) -> Optional[float]:
    """The largest of the four weight gradients' relative errors (None where either is missing)."""
    if dw is None or ref is None:
        return None
    return max(_rel_err(dw[n], ref[n]) for n in ref)


def _max_diff(a: StepResult, b: StepResult) -> float:
    """The largest absolute difference between two steps' results (0.0: equal bit for bit)."""
    pairs = [(a.out, b.out)]
    if a.dx is not None and b.dx is not None:
        pairs.append((a.dx, b.dx))
    if a.dw is not None and b.dw is not None:
        pairs += [(a.dw[n], b.dw[n]) for n in a.dw]
    return max((u.float() - v.float()).abs().max().item() for u, v in pairs)


def _profile(model, x, dev, top: int) -> dict[str, Any]:
    """One forward + backward step under the profiler: its ``top`` kernels (CUDA) or ops (CPU)
    by self time, and on CUDA each kernel launch in order (``launches``: name and ms, the
    three weight-gradient launches apart) and the summed kernel time (``kernel_ms``), which
    the step's time less is the time the GPU idled or waited for the host; ``idle`` says where
    (``bench_timeline``; the profiler's own host cost makes host-bound gaps somewhat longer)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    model.zero_grad(set_to_none=True)
    x.grad = None
    _sync(dev)
    with profile(activities=acts) as prof:
        _step(model, x)
        _sync(dev)
    # On CUDA the kernels themselves (a CPU op's "self device time" repeats its kernels').
    cuda = dev.type == "cuda"
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages()
              if getattr(e, attr, 0) > 0 and (e.device_type != torch.autograd.DeviceType.CPU) == cuda]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    out: dict[str, Any] = {"top": [{"name": e.key, "calls": e.count, "ms": getattr(e, attr) / 1e3}
                                   for e in events[:top]]}
    if cuda:
        kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
        out["kernel_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        out["launches"] = [{"name": e.name, "ms": e.time_range.elapsed_us() / 1e3} for e in kernels]
        cpu_starts = [e.time_range.start for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CPU]
        if cpu_starts:  # the step's first host op: where its CUDA-event timing starts
            out["idle"] = bench_timeline.idle(
                [(e.name, e.time_range.start, e.time_range.end) for e in kernels], min(cpu_starts))
    return out


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (0 when both are 0)."""
    err = (a.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    return err / scale if scale > 0 else err


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _gib(v: Optional[float], spec: str) -> str:
    """A size with its unit, or "-" alone where the row measured none."""
    return "-" if v is None else f"{format(v, spec)} GiB"


def parse_shape(text: Optional[str], on_cuda: bool) -> tuple[str, tuple[int, int, int, int, int]]:
    if text is None:
        return ("olmoe-like", SHAPES["olmoe-like"]) if on_cuda else ("cpu-small", CPU_DEFAULT_SHAPE)
    if text in SHAPES:
        if not on_cuda:
            raise BenchError(f"--shape {text} is a GPU shape and needs a CUDA device (none available, or --device cpu); "
                             f"on CPU pass a small shape such as --shape {','.join(map(str, CPU_DEFAULT_SHAPE))}")
        return text, SHAPES[text]
    parts = text.split(",")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 5 or min(vals) < 1:
        raise BenchError(f"--shape must be olmoe-like, mixtral-like or T,d,I,E,k with positive integers, got {text!r}")
    T, d, I, E, k = vals
    if k > E:
        raise BenchError(f"--shape: top-k ({k}) cannot exceed the number of experts ({E})")
    if E > MAX_EXPERTS:
        raise BenchError(f"--shape: E={E} experts is more than the bench takes ({MAX_EXPERTS}): the loop model "
                         f"builds one module per expert and each compiled row unrolls one loop iteration per "
                         f"expert, so its build and compile time grow with E")
    if T * k >= 2**31:
        raise BenchError(f"--shape: T*k = {T * k} (token, expert) pairs do not fit the int32 group offsets "
                         f"torch._grouped_mm takes (at most {2**31 - 1})")
    return "custom", vals  # type: ignore[return-value]


def bytes_needed(T: int, d: int, I: int, E: int, k: int, elem: int, impls: list[str]) -> int:
    """An estimate, a lower bound, of the bytes a bench run holds at once: the loop model's
    weights and, for the row that needs most, either their gradients (eager-loop) or a copy of
    its own with the copy's gradients (every other MoE row; dense-equivalent copies one
    expert); plus what every row's step makes: x, the output and dL/dx ([T, d] each), the
    activated hidden of the T*k pairs ([T*k, I]) and the router's fp32 [T, E] probabilities;
    the eager loop's int64 [T, k, E] one_hot mask.
    Gathered row copies, the rows' results kept for the comparisons and allocator slack come on
    top."""
    weights = E * (3 * d * I + d) * elem
    per_row = {impl: 2 * weights + T * k * E * 8 if impl == "eager-loop"  # + its int64 one_hot mask
               else weights + 2 * 3 * d * I * elem if impl == DENSE
               else 3 * weights for impl in impls}
    acts = (3 * T * d + T * k * I) * elem + T * E * 4
    return max(per_row.values(), default=weights) + acts


def device_memory(dev: torch.device) -> Optional[int]:
    """The device's memory in bytes: the GPU's total, or the machine's physical memory (None
    where the platform does not say)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf, or no such name (not Linux/macOS)
        return None


def _check_memory(T: int, d: int, I: int, E: int, k: int, dtype: torch.dtype, impls: list[str],
                  dev: torch.device) -> None:
    need, have = bytes_needed(T, d, I, E, k, dtype.itemsize, impls), device_memory(dev)
    if have is not None and need > have:
        where = (f"the GPU's memory ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                 else "this machine's physical memory")
        raise BenchError(f"--shape T={T} d={d} I={I} E={E} k={k}: the bench needs at least {need / GiB:,.1f} GiB "
                         f"in {str(dtype).replace('torch.', '')} (an estimate: weights, a row's weight copy and "
                         f"gradients, one step's activations), more than {where}, {have / GiB:,.1f} GiB; "
                         f"pass a smaller shape")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


EXIT_STATUS = ("exit status: 0 when every row ran; 1 when any row failed (its note in the table says why; "
               "the table, targets and --json are still written); 2 for bad arguments, before any row runs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXIT_STATUS
    p.add_argument("--shape", default=None,
                   help="olmoe-like | mixtral-like (GPU) | T,d,I,E,k; default olmoe-like on CUDA, "
                        f"{','.join(map(str, CPU_DEFAULT_SHAPE))} on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--impl", action="append", choices=IMPLS, metavar="NAME",
                   help=f"run only this row (repeatable): {', '.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed steps; the median is reported (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--profile", type=int, nargs="?", const=8, default=None, metavar="N",
                   help="after timing, profile one more step of each row and print its N most "
                        "expensive GPU kernels (CPU ops on CPU) by self time (default N: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")


def _build(impl: str, loop: LoopMoE, x: torch.Tensor) -> tuple[nn.Module, Callable[[], dict]]:
    """The model of one row, plus a callable giving extra facts after it ran."""
    if impl == DENSE:
        return DenseEquivalent(loop, x), dict
    if impl == "eager-loop":
        return loop, dict
    if impl == "sort-grouped-mm":
        return SortedMoE(loop), dict
    graphs = {"mode": "reduce-overhead"} if impl.endswith("-cudagraphs") else {}
    if impl.startswith("sort-grouped-mm-compile"):
        return torch.compile(SortedMoE(loop), **graphs), dict
    if impl == "hf-grouped-mm-compile":
        return torch.compile(SortedMoE(loop, hf_layout=True)), dict
    if impl.startswith("blazec-loop"):
        import blazec.backend  # noqa: F401  (registers the backend)
        from blazec import report

        # (torch.compile takes options= or mode=, not both)
        opts = {"options": {"moe_recompute": "recompute_gemm1"}} if impl.endswith("recompute") else graphs
        compiled = torch.compile(copy.deepcopy(loop), backend="blaze", **opts)
        records: list = []

        class _Wrapped(nn.Module):  # keeps the blaze reports of the first (compiling) call
            def __init__(self):
                super().__init__()
                self.m = compiled

            def forward(self, x):
                if records:
                    return self.m(x)
                with report.capture() as recs:
                    out = self.m(x)
                records.extend(recs or [None])
                return out

        def facts() -> dict:
            return {"rewrites": sum(r.num_rewrites for r in records if r is not None)}

        return _Wrapped(), facts
    if impl.startswith("blazec-ops"):
        return BlazeOpsMoE(loop, impl.endswith("recompute")), dict
    raise AssertionError(impl)


def _clear_paths_taken() -> None:
    try:
        from blazec.kernels import wgrad_grouped_mm
    except ImportError:  # no triton
        return
    wgrad_grouped_mm.TAKEN.clear()


# torch's defaults of the two Dynamo settings that importing blazec.backend turns on: the
# baseline rows compile with them, as a user's own code would without blazec.
TORCH_CAPTURE_DEFAULTS = {"capture_scalar_outputs": False, "capture_dynamic_output_shape_ops": False}


@contextlib.contextmanager
def _row_env(impl: str):
    """The row's environment variables (``ROW_ENV``), set for its duration, then restored; a
    row that is not blazec's runs under torch's default Dynamo capture settings (the first
    blazec row's import of the backend turned them on for every row after it)."""
    env = ROW_ENV.get(impl, {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dynamo = (contextlib.nullcontext() if impl.startswith("blazec")
              else torch._dynamo.config.patch(**TORCH_CAPTURE_DEFAULTS))
    try:
        with dynamo:
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_note(dev: torch.device, impl: str) -> str:
    if not impl.startswith("blazec"):
        return ""
    if dev.type != "cuda":
        return "reference ops (CPU)"
    from blazec.ops import get_impl

    fn = get_impl("moe_experts", "cuda")
    if not fn.__module__.startswith("blazec.kernels"):
        return "reference ops (no kernels)"
    from blazec.kernels import moe_experts, wgrad_grouped_mm

    taken = " + ".join(sorted(wgrad_grouped_mm.TAKEN)) or "-"
    gemm1, rows, dx = moe_experts.gemm1_mode(), moe_experts.rows_mode(), moe_experts.dx_mode()
    return (f"Triton kernels, weight gradients: {taken}"
            + (", fused dh" if moe_experts.dh_mode() == "fused" else "")
            + (f", GEMM 1 {gemm1} (forced)" if gemm1 != "auto" else "")
            + (f", row GEMMs {rows} (forced)" if rows != "auto" else "")
            + (f", dX {dx} (forced)" if dx != "auto" else ""))


def _graph_skips() -> int:
    """How many times Inductor has declined CUDA graphs in this process (it only logs why)."""
    from torch._dynamo.utils import counters

    return counters["inductor"].get("cudagraph_skips", 0)


def _autotune_choices() -> dict:
    """The Triton configs the kernels' autotuners picked in this run (empty if none ran)."""
    try:
        from blazec.kernels.moe_experts import autotune_choices
    except ImportError:  # no triton
        return {}
    return autotune_choices()


def run(args: argparse.Namespace, stream=None) -> int:
    stream = stream or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=stream, flush=True)

    try:
        has_cuda = torch.cuda.is_available()
        if args.device == "cuda" and not has_cuda:
            raise BenchError("--device cuda: CUDA is not available on this machine")
        on_cuda = has_cuda and args.device != "cpu"
        name, (T, d, I, E, k) = parse_shape(args.shape, on_cuda)
        dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
        if not 0 <= args.seed < 2**63:
            raise BenchError(f"--seed must be in [0, 2**63), got {args.seed}")
        if args.json is not None and not args.json.strip():
            raise BenchError("--json needs a file path, got an empty one")
        if args.iters < 1 or args.warmup < 0:
            raise BenchError("--iters must be >= 1 and --warmup >= 0")
        if args.profile is not None and args.profile < 1:
            raise BenchError(f"--profile N needs N >= 1 (or no N, for 8), got {args.profile}")
        dev = torch.device("cuda" if on_cuda else "cpu")
        if args.impl:
            impls, left_out = list(dict.fromkeys(args.impl)), []
        else:
            left_out = [] if on_cuda else [i for i in IMPLS if i in CPU_SAME_AS]
            impls = [i for i in IMPLS if i not in left_out]
        _check_memory(T, d, I, E, k, dtype, impls, dev)
        if args.json:
            _check_writable(args.json)
    except BenchError as e:
        print(f"blazec bench: error: {e}", file=sys.stderr)
        return 2

    # The kernels are the default on CUDA; BLAZEC_KERNELS=0 measures the reference ops instead
    # (the rows' notes say which ran).
    os.environ.setdefault("BLAZEC_KERNELS", "1")
    flops = 3 * T * k * 2 * d * 3 * I
    card = torch.cuda.get_device_name(dev) if on_cuda else "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "shape": name, "T": T, "d": d, "I": I, "E": E, "k": k, "dtype": str(dtype).replace("torch.", ""),
        "device": card, "torch": torch.__version__, "triton": triton_version,
        "date": datetime.date.today().isoformat(), "warmup": args.warmup, "iters": args.iters,
        "gflop_per_step": flops / 1e9, "rows_left_out": left_out,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("BLAZEC_")},  # kernel path choices
    }
    say(f"blazec bench: MoE SwiGLU layer with router, T={T} d={d} I={I} E={E} k={k}, {meta['dtype']}, "
        f"forward + backward; {card}, torch {torch.__version__}, triton {triton_version}, {meta['date']}")
    if not on_cuda:
        say("NOTE: running on CPU at a small shape. CPU timings are not the GPU claim "
            "(see docs/BASELINES.md and docs/BENCHMARKS.md); 'act' is bytes saved for backward.")
    if left_out:
        say(f"NOTE: left out on CPU: {', '.join(left_out)}: each differs from another row only by a GPU "
            f"launch path (a Triton kernel choice or CUDA graphs), so here it runs that row's code "
            f"(--impl NAME runs one anyway).")

    torch.manual_seed(args.seed)
    with torch.device(dev):
        loop = LoopMoE(d, I, E, k).to(dtype)
    x = torch.randn(T, d, device=dev, dtype=dtype).requires_grad_()

    rows: list[Row] = []
    failed: list[str] = []  # rows that raised (their notes say what): the exit status is 1
    ref: Optional[StepResult] = None
    try:  # SIGINT (the GPU script's timeout) stops the rows; what ran is still reported
        for impl in impls:
            row = Row(impl)
            say(f"  running {impl} ...")
            first_diff = None
            skips = _graph_skips()
            try:
                with _row_env(impl):
                    _clear_paths_taken()
                    model, facts = _build(impl, loop, x)
                    model.zero_grad(set_to_none=True)
                    x.grad = None
                    # compiles and autotunes where needed, outside the measurements
                    first = _result(model, x, _step(model, x))
                    if impl.endswith("-cudagraphs"):  # the step that records the graphs: the
                        _step(model, x)  # memory step below then measures a replay, as timed
                    peak, act, res = _memory(model, x, dev)
                    first_diff = _max_diff(first, res)
                    del first
                    row.ms, host_ms = _time(model, x, dev, args.warmup, args.iters)
                    row.tflops = flops / (row.ms * 1e-3) / 1e12
                    graph_pool = on_cuda and impl.endswith("-cudagraphs")  # held from recording on
                    row.peak_gib, row.act_gib = (None, None) if graph_pool else (peak, act)
                    if impl == "eager-loop":
                        ref = res
                    elif ref is None and impl != DENSE:  # the reference row was not requested: run it untimed
                        ref = _memory(loop, x, dev)[2]
                    if impl != DENSE:
                        row.err_out = _rel_err(res.out, ref.out)
                        row.err_dx = _rel_err(res.dx, ref.dx)
                        row.err_dw = _dw_err(res.dw, ref.dw)
                    del res
                    row.extra = facts()
                    row.extra["first_step_diff"] = first_diff
                    row.extra["host_ms"] = host_ms
                    if args.profile:
                        try:  # a profiler failure costs the profile, not the row's measurements
                            row.extra["profile"] = _profile(model, x, dev, args.profile)
                        except Exception as e:  # noqa: BLE001
                            row.extra["profile_error"] = f"{type(e).__name__}: {str(e).strip()[:160]}"
                    notes = [_kernel_note(dev, impl)]
                if impl == DENSE:
                    notes.append("dense GEMMs on T*k rows, same FLOPs, no routing (the % dense denominator)")
                if not on_cuda and impl in CPU_SAME_AS:
                    notes.append(f"same code as {CPU_SAME_AS[impl]} on CPU (its launch path exists only on GPU)")
                if on_cuda and impl.endswith("-cudagraphs"):
                    notes.append("CUDA graphs: no peak / act (the graphs' pool)" if _graph_skips() == skips
                                 else "CUDA GRAPHS SKIPPED (Inductor's log says why): not a graph row")
                if "rewrites" in row.extra:
                    n = row.extra["rewrites"]
                    notes.append(f"{n} MoE rewrite(s)" if n else "blaze rewrote nothing!")
                if impl.startswith("blazec") and first_diff:  # deterministic kernels: must be 0
                    notes.append(f"FIRST STEP DIFFERS from a later one by {first_diff:.2e}")
                row.note = "; ".join(n for n in notes if n)
            except torch.cuda.OutOfMemoryError as e:
                row.note = f"OOM ({str(e).splitlines()[0][:80]})"
                failed.append(impl)
            except Exception as e:  # noqa: BLE001 - a failing row is a result, like in BASELINES.md
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                row.note = f"failed: {type(e).__name__}: {msg if len(msg) <= 240 else msg[:237] + '...'}"
                failed.append(impl)
            finally:
                model = None  # free this row's weights before the next row builds its own
                if on_cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            # As each row ends, so that a run stopped part-way (a timeout) still has its rows.
            first = "" if first_diff is None else ("; first step: bitwise equal to a later one" if first_diff == 0
                                                     else f"; first step differs by {first_diff:.1e}")
            host = row.extra.get("host_ms") if on_cuda else None  # on CPU the step is host time
            say(f"    {impl}: {_fmt(row.ms, '.2f')} ms" + (f" (host {host:.2f} ms)" if host is not None else "")
                + f", peak {_gib(row.peak_gib, '.3f')}, "
                f"act {_gib(row.act_gib, '.3g')}, err {_fmt(row.err_out, '.1e')} / {_fmt(row.err_dx, '.1e')}"
                f" / {_fmt(row.err_dw, '.1e')}" + first + (f"; {row.note}" if row.note else ""))
            try:  # a row that failed may leave compiled state that will not reset
                torch._dynamo.reset()
            except Exception as e:  # noqa: BLE001
                say(f"    (torch._dynamo.reset() failed after {impl}: {type(e).__name__}: {str(e)[:120]})")
    except KeyboardInterrupt:
        say(f"  interrupted after {len(rows)} of {len(impls)} rows; the table and targets below are theirs")

    dense = next((r.tflops for r in rows if r.impl == DENSE and r.tflops), None)
    for r in rows:
        if dense and r.tflops:
            r.pct_dense = 100 * r.tflops / dense
    mm_n = 8192 if on_cuda else 256
    try:  # BASELINES.md's reference: a dense matmul's TFLOP/s on this card, in this run
        meta["matmul"] = {"n": mm_n, "dtype": str(dtype).replace("torch.", ""),
                          "tflops": matmul_tflops(dev, dtype, mm_n)}
    except Exception as e:  # noqa: BLE001 - the reference is a reading, not a row
        meta["matmul"] = {"n": mm_n, "error": f"{type(e).__name__}: {str(e).strip()[:160]}"}
    head = ["implementation", "ms", "TFLOP/s", "% dense", "peak GiB", "act GiB", "err out", "err dx", "err dW",
            "note"]
    table = [[r.impl, _fmt(r.ms, ".2f"), _fmt(r.tflops, ".1f" if on_cuda else ".3g"), _fmt(r.pct_dense, ".0f"),
              _fmt(r.peak_gib, ".3f"), _fmt(r.act_gib, ".3f" if on_cuda else ".3g"), _fmt(r.err_out, ".1e"),
              _fmt(r.err_dx, ".1e"), _fmt(r.err_dw, ".1e"), r.note] for r in rows]
    say("")
    say("| " + " | ".join(head) + " |")
    say("|" + "|".join("---" for _ in head) + "|")
    for line in table:
        say("| " + " | ".join(line) + " |")
    say("")
    say(f"ms: median of {args.iters} forward+backward steps after {args.warmup} warm-ups; TFLOP/s: "
        f"{flops / 1e9:.3g} GFLOP of expert GEMMs per step; % dense: of the dense-equivalent row's "
        f"TFLOP/s; err: max abs error / max abs value, vs eager-loop (dW: the largest of the router's "
        f"and the three expert weights')." + (" host (in each row's line): median time the host took to "
        "issue a step; near the step's ms, the step was host-bound." if on_cuda else ""))
    mm = meta["matmul"]
    if "tflops" in mm:
        blaze = next((r for r in rows if r.impl == "blazec-loop" and r.tflops), None)
        say(f"dense matmul in this run: torch.mm of two {mm['n']}x{mm['n']} {mm['dtype']} matrices, "
            f"{mm['tflops']:.4g} TFLOP/s" + (f"; blazec-loop reaches {100 * blaze.tflops / mm['tflops']:.0f}% of it"
                                            if blaze else ""))
    else:
        say(f"dense matmul in this run: failed: {mm['error']}")
    for r in rows:
        if r.extra.get("profile_error"):
            say(f"profile {r.impl}: failed: {r.extra['profile_error']}")
        if r.extra.get("profile"):
            prof = r.extra["profile"]
            what = "kernels" if on_cuda else "CPU ops"
            say(f"profile {r.impl}, top {what} of one step by self time:")
            for p in prof["top"]:
                say(f"  {p['ms']:9.3f} ms  {p['calls']:4d}x  {p['name'][:100]}")
            if "kernel_ms" in prof:
                big = [f"{p['name'][:24]} {p['ms']:.3f}" for p in prof["launches"] if p["ms"] >= 0.05]
                more = f", and {len(big) - 40} more" if len(big) > 40 else ""
                say(f"  kernels: {len(prof['launches'])} launches, {prof['kernel_ms']:.3f} ms in all; "
                    f"those of 0.05 ms or more, in order: " + ", ".join(big[:40]) + more)
            if prof.get("idle"):
                say(bench_timeline.describe(prof["idle"]))
    targets = check_targets(rows, name, T, I, E, k, dtype.itemsize)
    if targets:
        say("targets (docs/BASELINES.md, 'What blazec must reach'; against the baseline rows of this run"
            + ("; CPU: not the claim" if not on_cuda else "") + "):")
        for t in targets:
            say(t.line())
        meta["targets"] = [{**asdict(t), "met": t.met} for t in targets]
    if not on_cuda:
        say("CPU timings are not the GPU claim.")
    else:
        meta["autotune"] = _autotune_choices()
        for kernel, picks in meta["autotune"].items():
            for key, cfg in picks.items():
                say(f"autotune {kernel} {key}: {cfg}")
    meta["rows_failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
        say(f"wrote {args.json}")
    if failed:  # the table above has each failed row's note
        print(f"blazec bench: error: {len(failed)} of {len(rows)} row(s) failed: {', '.join(failed)} "
              f"(each row's note in the table says why)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m blazec.bench``: the same as ``blazec bench``, one-line errors included."""
    from blazec.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
