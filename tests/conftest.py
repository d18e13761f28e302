"""Every test starts from a fresh Dynamo cache and a fixed seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
