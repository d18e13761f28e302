"""Kernel tests run the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``.

``@triton.jit`` reads TRITON_INTERPRET when a kernel is *defined*, and triton itself when it is
imported, so the root ``tests/conftest.py`` sets it (no GPU) before anything is collected.
On a machine with CUDA and without TRITON_INTERPRET set, the same tests run the compiled
kernels on the GPU instead (``KERNEL_DEVICE``), which makes them the first GPU check.

Every buffer the launchers allocate is poisoned (NaN / a sentinel integer) so that an element a
kernel forgot to write fails the comparison, and every interpreted launch runs under the memory
sanitizer (``sanitizer.py``), which fails a test whose kernels access memory outside their
tensors or race between programs: bugs the sequential interpreter cannot show by itself.

The interpreter's integer-overflow instrumentation is switched off (``_dead_overflow_checks_off``):
it recomputes every int32 add, sub and mul in int64 and compares it with the int32 bounds, then
hands the result to ``device_assert``, which returns at once unless the options' ``debug`` is set,
and the interpreter's options leave it off. That dead work was about 40% of an interpreted launch.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"
if ON_GPU:
    # Correctness, not speed: each kernel runs its first fitting config instead of autotuning
    # every shape the tests use (minutes of GPU time). `blazec bench` autotunes, and its error
    # columns check the configs it picks.
    os.environ.setdefault("BLAZEC_AUTOTUNE", "0")


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run here, or None.

    triton 3.6 (torch 2.11's) turns a scalar kernel argument into a Python int with
    ``int(array_of_one)``, which numpy >= 2.4 rejects, so every kernel with a ``range(n)`` loop
    fails inside the interpreter. Later triton squeezes first. The kernels themselves are fine
    (their tests pass on triton 3.6 with numpy 2.2); the environment is what cannot run them.
    """
    if ON_GPU:
        return None
    import numpy as np
    import triton

    try:
        int(np.zeros(1))
    except TypeError:
        import inspect

        from triton.runtime import interpreter

        src = inspect.getsource(interpreter)
        if "int(self.handle.data)" in src:
            return (f"triton {triton.__version__}'s interpreter cannot run with numpy {np.__version__}: "
                    "install numpy<2.4, or triton>=3.8")
    return None


_PROBLEM = _interpreter_problem()


def _dead_overflow_checks_off() -> bool:
    """Turn off the interpreter's ``sanitize_overflow`` where its asserts cannot fire (``debug``
    off); True if it was on and is now off."""
    if ON_GPU:
        return False
    import dataclasses

    from triton.runtime import interpreter as ti

    opts = getattr(ti.interpreter_builder, "options", None)
    if not dataclasses.is_dataclass(opts) or not getattr(opts, "sanitize_overflow", False) or getattr(opts, "debug", True):
        return False
    ti.interpreter_builder.options = dataclasses.replace(opts, sanitize_overflow=False)
    return True


_dead_overflow_checks_off()


def pytest_collection_modifyitems(config, items):
    if _PROBLEM is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=_PROBLEM))


@pytest.fixture(autouse=True)
def _poison():
    from blazec.kernels._common import set_poison

    old = set_poison(True)
    yield
    set_poison(old)


@pytest.fixture(autouse=True)
def _sanitize(request):
    """Every interpreted launch of a kernel test goes through ``tests/kernels/sanitizer.py``:
    in-bounds accesses only, one writer per byte, no read of a byte another program (or, before
    it, the same program) writes in the launch. test_sanitizer.py runs its own, on kernels built
    to break these rules."""
    if ON_GPU or request.module.__name__.endswith("test_sanitizer"):
        yield
        return
    from tests.kernels.sanitizer import Sanitizer

    with Sanitizer() as san:
        yield
    san.assert_clean(allow_empty=True)
