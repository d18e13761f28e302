"""Every test starts from a fresh Dynamo cache and a fixed seed.

Inductor's FX graph cache and AOTAutograd's cache are off for the whole session: on a cache
hit the blaze passes and the partitioner do not run at all, so a test that reads their
reports would depend on what earlier runs left in the on-disk cache. They are switched off
through the environment (read when torch._inductor is first imported, and inherited by
subprocesses), not by importing torch._inductor here: that would import triton before
tests/kernels/conftest.py sets TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
