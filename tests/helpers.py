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


def blaze_unless_unchanged(gm, example_inputs, options=None, on_pre_grad=None):
    """The blaze backend, except for a graph its pre-grad passes leave as it was: that one runs
    as Dynamo captured it (what backend="eager" does), without AOTAutograd, blaze's partitioner
    and post-grad passes, and Inductor.

    For the tests of the MoE passes' decisions, most of which expect a site to be left alone:
    their graph then computes eager's numbers whatever the later stages do, and those stages
    (about 60% of such a test's time) are tested on their own. A graph the passes rewrote
    takes every stage, and the report capture gets the same record either way (without the
    partition and post-grad reports when the stages are skipped).

    ``on_pre_grad(graph, reports)``, if given, sees the pre-grad passes' graph and reports."""
    from blazec.backend import compile_stage, pre_grad_stage
    from blazec.config import BlazeConfig

    config = BlazeConfig.from_options(options)
    new_gm, record, patches = pre_grad_stage(gm, example_inputs, config)
    if on_pre_grad is not None:
        on_pre_grad(new_gm, list(record.pass_reports))
    if new_gm.code == gm.code:
        return gm.forward
    return compile_stage(new_gm, example_inputs, config, record, patches)


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


def cold_graph_caches_env(tmp_path: Path) -> dict:
    """The environment for a subprocess that tests Inductor's FX graph and AOTAutograd caches
    from cold: both caches on (tests/conftest.py turns them off), and a cache dir of its own,
    ``tmp_path``, where neither has an entry.

    The C++ kernels this session's Inductor already built (and its precompiled headers) are
    hard-linked into that dir, so the subprocess does not rebuild them: those are a separate
    cache, keyed by the kernel's source, that these tests do not test, and with an empty dir
    rebuilding them was most of their time (61.6 s against 22.8 s for one of them).
    """
    import os
    import shutil

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        shared = Path(cache_dir())
        for entry in shared.iterdir() if shared.is_dir() else ():
            if entry.name in ("fxgraph", "aotautograd", "locks") or not entry.is_dir():
                continue
            shutil.copytree(entry, tmp_path / entry.name, copy_function=os.link, dirs_exist_ok=True)
    except (ImportError, OSError):
        pass  # a cold C++ cache as well: slower, the same test
    return env


def slow_cases(*ids: str):
    """Mark the cases of the ``@pytest.mark.parametrize`` just below (named by their ids) slow:
    variants of the cases the default run keeps (README, "Tests"). An id that names no case is
    an error, so that a renamed case cannot leave the default run by accident."""
    import pytest

    def mark(fn):
        param = fn.pytestmark[-1]  # the decorator applied last: the one just below
        assert param.name == "parametrize", f"{fn.__name__}: slow_cases goes right above a parametrize"
        argnames, values = param.args[:2]
        kwargs = dict(param.kwargs)
        names = kwargs.pop("ids", None)
        single = len([a for a in (argnames.split(",") if isinstance(argnames, str) else argnames) if a.strip()]) == 1
        cases, seen = [], set()
        for i, v in enumerate(values):
            if hasattr(v, "values") and hasattr(v, "marks"):  # already a pytest.param
                vals, marks, case_id = v.values, list(v.marks), v.id
            else:
                vals, marks, case_id = ((v,) if single else tuple(v)), [], names[i] if names else None
            if case_id in ids:
                seen.add(case_id)
                marks.append(pytest.mark.slow)
            cases.append(pytest.param(*vals, marks=marks, id=case_id))
        unknown = set(ids) - seen
        assert not unknown, f"{fn.__name__}: slow_cases names no case {sorted(unknown)}"
        fn.pytestmark[-1] = pytest.mark.parametrize(argnames, cases, **kwargs).mark
        return fn

    return mark
