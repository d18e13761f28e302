"""Every example runs eager and under blaze (Inductor) with the same outputs and gradients."""

import copy

import pytest

from tests.helpers import EXAMPLE_FILES, assert_same_training, load_example


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_matches_eager(name):
    model, inputs = load_example(name).make()
    assert_same_training(copy.deepcopy(model), model, inputs, {"backend": "blaze"}, atol=2e-5, rtol=1e-4)
