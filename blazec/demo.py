"""``blazec demo``: the README's main job.

Builds the embedded naive MoE block (:mod:`blazec.demo_model`), compiles it with blaze on
CPU, prints what blaze rewrote, and then eager and blaze side by side: max abs error of the
output and of every gradient, median time per training step, and the bytes autograd saves
for backward (measured with saved-tensor hooks, so the number is device-independent).
Timings on CPU are informative only; the speed claims are GPU numbers in docs/BENCHMARKS.md.

Before anything is built, sizes below 1, a top-k above the number of experts, more than
``MAX_EXPERTS`` experts (as ``blazec bench``: Dynamo unrolls one loop iteration per expert, so
the compile time grows with E), or an estimated footprint (:func:`bytes_needed`) above the
machine's memory are an error (``ValueError``, one line from the CLI).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import torch

from blazec import report
from blazec.bench import GiB, MAX_EXPERTS, device_memory
from blazec.demo_model import make_default
from blazec.memory import model_tensors, saved_for_backward


def bytes_needed(tokens: int, d: int, inter: int, num_experts: int, top_k: int) -> int:
    """An estimate, a lower bound, of the bytes the demo holds at once (fp32): the block's
    weights twice (the eager model and blaze's copy) with their gradients, and one step's
    activations: x, the norm's output, the accumulator and the output ([T, d] each), the
    router's logits and probabilities ([T, E]), the one-hot mask (int64 [T, k, E]), and the
    gathered rows ([T*k, d]) with their gate, up and hidden ([T*k, I] each). What autograd
    saves beyond these, the compiled model's buffers and allocator slack come on top."""
    weights = (num_experts * (3 * d * inter + d) + d) * 4
    acts = (4 * tokens * d + 2 * tokens * num_experts + tokens * top_k * (d + 3 * inter)) * 4
    return 4 * weights + acts + tokens * top_k * num_experts * 8


def check_sizes(tokens: int, d: int, inter: int, num_experts: int, top_k: int, steps: int) -> None:
    """The demo's sizes, checked before anything is built; a ``ValueError`` names the flag."""
    for flag, v in (("tokens", tokens), ("d", d), ("inter", inter), ("experts", num_experts),
                    ("top-k", top_k), ("steps", steps)):
        if v < 1:
            raise ValueError(f"--{flag} must be >= 1, got {v}")
    if top_k > num_experts:
        raise ValueError(f"--top-k ({top_k}) cannot exceed --experts ({num_experts})")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"--experts {num_experts} is more than the demo takes ({MAX_EXPERTS}): the block builds "
                         f"one module per expert and Dynamo unrolls one loop iteration per expert, so its build and "
                         f"compile time grow with the number of experts")
    need, have = bytes_needed(tokens, d, inter, num_experts, top_k), device_memory(torch.device("cpu"))
    if have is not None and need > have:
        raise ValueError(f"--tokens {tokens} --d {d} --inter {inter} --experts {num_experts} --top-k {top_k}: the "
                         f"demo needs at least {need / GiB:,.1f} GiB (an estimate: two copies of the weights, their "
                         f"gradients, one step's activations), more than this machine's physical memory, "
                         f"{have / GiB:,.1f} GiB; pass smaller sizes")


def _step(model, inputs) -> tuple[torch.Tensor, Any]:
    def fwd():
        return model(*inputs)

    out, saved = saved_for_backward(fwd, model_tensors(model, inputs))
    out.float().pow(2).mean().backward()
    return out, saved


def _time(model, inputs, steps: int) -> float:
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(*inputs).float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(tokens: int = 1024, d: int = 128, inter: int = 256, num_experts: int = 8, top_k: int = 2,
        steps: int = 5, final_stage: str = "inductor", stream=sys.stdout) -> dict[str, Any]:
    def say(msg: str) -> None:
        print(msg, file=stream, flush=True)

    check_sizes(tokens, d, inter, num_experts, top_k, steps)
    model, inputs = make_default(tokens, d, inter, num_experts, top_k)
    blaze_model = copy.deepcopy(model)
    say(f"blazec demo: naive loop MoE block, T={tokens} tokens, d={d}, I={inter}, E={num_experts}, "
        f"top-k={top_k}, fp32 on {inputs[0].device.type.upper()}, torch {torch.__version__}")

    say("[1/3] eager step ...")
    ref_out, ref_saved = _step(model, inputs)

    slow = (f"; Dynamo traces the loop once for each of the {num_experts} experts, so it grows with E"
            if num_experts > 64 else "")
    say(f"[2/3] compiling with torch.compile(backend='blaze', options={{'final_stage': '{final_stage}'}}) "
        f"(the first compile takes a while{slow}) ...")
    torch._dynamo.reset()
    compiled = torch.compile(blaze_model, backend="blaze", options={"final_stage": final_stage})
    t0 = time.perf_counter()
    with report.capture() as records:
        out, saved = _step(compiled, inputs)
    compile_s = time.perf_counter() - t0

    rewrites = sum(r.num_rewrites for r in records)
    say(f"      compiled {len(records)} graph(s) in {compile_s:.1f} s; blaze rewrote {rewrites} MoE site(s):")
    for rec in records:
        for rep in rec.pass_reports:
            if rep.name == "comm_overlap" and not (rep.matches or rep.near_misses or rep.notes or rep.skipped):
                continue  # collectives only: a single-process demo has none (blazec dump shows every pass)
            for line in rep.lines():
                say(f"      {line}")

    say(f"[3/3] timing {steps} training steps each ...")
    eager_ms = _time(model, inputs, steps)
    blaze_ms = _time(compiled, inputs, steps)

    grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), blaze_model.parameters())]
    out_err = (out - ref_out).abs().max().item()
    grad_err = max((a - b).abs().max().item() for _, a, b in grads if a is not None and b is not None)
    rows = [
        ("max abs error, output", "-", f"{out_err:.2e}"),
        ("max abs error, gradients", "-", f"{grad_err:.2e}"),
        ("time per train step (ms, CPU)", f"{eager_ms:.1f}", f"{blaze_ms:.1f}"),
        ("bytes saved for backward", f"{ref_saved.activation_bytes:,d}", f"{saved.activation_bytes:,d}"),
        ("tensors saved for backward", f"{ref_saved.activation_tensors}", f"{saved.activation_tensors}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    say("")
    say(f"{'':<{w0}}  {'eager':>14}  {'blaze':>14}")
    for name, a, b in rows:
        say(f"{name:<{w0}}  {a:>14}  {b:>14}")
    ratio = saved.activation_bytes / max(ref_saved.activation_bytes, 1)
    say(f"\nblaze keeps {ratio:.2f}x the activation bytes of eager for backward; "
        f"{rewrites} rewrite(s). CPU timings are not the GPU claim (see docs/BENCHMARKS.md).")
    return {"rewrites": rewrites, "out_err": out_err, "grad_err": grad_err, "eager_ms": eager_ms,
            "blaze_ms": blaze_ms, "eager_saved": ref_saved.activation_bytes, "blaze_saved": saved.activation_bytes}
