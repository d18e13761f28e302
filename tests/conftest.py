"""Every test starts from a fresh Dynamo cache and a fixed seed.

Inductor's FX graph cache and AOTAutograd's cache are off for the whole session: on a cache
hit the blaze passes and the partitioner do not run at all, so a test that reads their
reports would depend on what earlier runs left in the on-disk cache.
"""

import os

import pytest
import torch

os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"  # also for the subprocesses tests start
os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
