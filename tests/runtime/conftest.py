"""Runtime-helper tests run on one intra-op thread.

Their tensors are tiny: on a busy 2-core machine intra-op threads spin against each other and
made these tests 50x slower. Restored afterwards so other test modules are unaffected. (The
multi-process gloo tests set their own thread count in each child.)
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
