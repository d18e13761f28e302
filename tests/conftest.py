"""Every test starts from a fresh Dynamo cache and a fixed seed.

Inductor's FX graph cache and AOTAutograd's cache are off for the whole session: on a cache
hit the blaze passes and the partitioner do not run at all, so a test that reads their
reports would depend on what earlier runs left in the on-disk cache. They are switched off
through the environment (read when torch._inductor is first imported, and inherited by
subprocesses), not by importing torch._inductor here: that would import triton before
TRITON_INTERPRET is set.

Without a GPU the Triton kernels run under the interpreter, and TRITON_INTERPRET=1 is set here,
before any test module is collected: collecting them imports torch._dynamo, which imports
triton, and triton 3.6 (torch 2.11's) builds its own ``@triton.jit`` helpers such as
``tl.zeros`` compiled-only when it is imported without the flag, so no kernel could be
interpreted afterwards. tests/kernels/conftest.py reads the decision from the environment.
"""

import os

import pytest
import torch

os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
# Inductor's CPU kernels without SIMD: blazec's code runs on GPUs, and the tests that take
# Inductor's CPU backend check numbers and graphs, not its vectorizer. A vectorized kernel
# compiles its ATen vector headers each time: cold (as in CI), 54.6 -> 33.4 s of CPU for the
# transformer block's Inductor tests (2-core sandbox, torch 2.13.0+cpu, 2026-11-28).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # compiled Triton cannot run without a GPU anyway


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
