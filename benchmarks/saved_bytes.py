"""Activation bytes saved for backward, eager naive code vs blaze, for every example form.

Device-independent: autograd's saved tensors are recorded with saved-tensor hooks
(blazec.memory.saved_for_backward), counting each storage once and leaving out parameters
and inputs. The shape defaults to the CPU reference of BASELINES.md: T=4096 tokens, d=256,
I=128, E=64, k=8, fp32 (GShard is top-2 by construction, so it runs with k=2; the per-pair
weight gather copies E weights per pair, so it runs at a smaller T to fit in memory).

    python benchmarks/saved_bytes.py [--tokens 4096] [--markdown]
"""

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch

from blazec.memory import model_tensors, saved_for_backward

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    spec.loader.exec_module(mod)
    return mod


def measure(model, inputs, blaze: bool) -> int:
    m = copy.deepcopy(model)
    if blaze:
        torch._dynamo.reset()
        run = torch.compile(m, backend="blaze", options={"final_stage": "eager"})
        run(*inputs)  # compile outside the measurement
    else:
        run = m
    out, saved = saved_for_backward(lambda: run(*inputs), model_tensors(m, inputs))
    out.float().pow(2).mean().backward()
    return saved.activation_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    T, d, I, E, k = a.tokens, 256, 128, 64, 8
    seq = 64
    cases = [
        ("static loop, ModuleList", "moe_loop_modulelist", dict(d=d, inter=I, num_experts=E, top_k=k), T),
        ("static loop, stacked", "moe_loop_stacked", dict(d=d, inter=I, num_experts=E, top_k=k), T),
        ("sort + split loop", "moe_sort_grouped_mm", dict(d=d, inter=I, num_experts=E, top_k=k), T),
        ("DeepSeek repeat + assign", "moe_deepseek_train", dict(d=d, inter=I, num_experts=E, top_k=k, shared=False),
         T),
        ("dense top-k gate", "moe_dense_gate", dict(d=d, inter=I, num_experts=E, top_k=k), T),
        ("GShard top-2, cf=1", "moe_gshard_top2", dict(d=d, inter=I, num_experts=E), T),
        ("per-pair weight gather", "moe_pair_gather_bmm", dict(d=d, inter=I, num_experts=E, top_k=k), T // 16),
    ]
    rows = []
    for label, name, kw, tokens in cases:
        model, inputs = load(name).make(batch=tokens // seq, seq=seq, **kw)
        eager = measure(model, inputs, blaze=False)
        blaze = measure(model, inputs, blaze=True)
        kk = 2 if "gshard" in name else k
        rows.append((label, tokens, kk, eager, blaze))
        print(f"{label:<26} T={tokens:<5} k={kk}  eager {eager / 2**20:9.1f} MiB  blaze {blaze / 2**20:8.1f} MiB"
              f"  ratio {blaze / eager:.3f}", flush=True)
    if a.markdown:
        print("\n| form | T | k | eager MiB | blaze MiB | blaze / eager |\n|---|---|---|---|---|---|")
        for label, tokens, kk, e, b in rows:
            print(f"| {label} | {tokens} | {kk} | {e / 2**20:.1f} | {b / 2**20:.1f} | {b / e:.3f} |")


if __name__ == "__main__":
    main()
