"""Shared test helpers: example loading and eager-vs-compiled comparison."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("moe_*.py"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, imported once per session."""
    import sys

    mod_name = f"blazec_bench_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[mod_name]


def loss_of(out) -> torch.Tensor:
    return out.float().pow(2).mean()


def run_train(model, inputs):
    """One forward + backward; returns (output, {param name: grad}, {input index: grad})."""
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss_of(out).backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    in_grads = {i: x.grad.clone() for i, x in enumerate(inputs) if x.grad is not None}
    return out.detach(), grads, in_grads


def assert_same_training(ref_model, model, inputs, compile_kwargs, atol=1e-5, rtol=1e-4):
    """Eager ``ref_model`` and ``torch.compile(model, **compile_kwargs)`` agree on outputs and grads."""
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kwargs)
    ref = run_train(ref_model, inputs)
    got = run_train(compiled, inputs)
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=rtol)
    assert got[1].keys() == ref[1].keys() and got[1], "the same parameters must get gradients"
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=atol, rtol=rtol, msg=lambda m: f"grad of {n}: {m}")
    assert got[2].keys() == ref[2].keys()
    for i in ref[2]:
        torch.testing.assert_close(got[2][i], ref[2][i], atol=atol, rtol=rtol)


def clone_model(m):
    return copy.deepcopy(m)
