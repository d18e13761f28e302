"""Every example runs eager and under blaze (Inductor) with the same outputs and gradients."""

import copy

import pytest

from tests.helpers import EXAMPLE_FILES, assert_same_training, load_example


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_matches_eager(name):
    model, inputs = load_example(name).make()
    assert_same_training(copy.deepcopy(model), model, inputs, {"backend": "blaze"}, atol=2e-5, rtol=1e-4)


def test_train_tiny_curves_agree(capsys):
    eager, blaze = load_example("train_tiny.py").main(["--steps", "6", "--final-stage", "eager"])
    assert len(eager) == len(blaze) == 6
    assert eager[-1] < eager[0], "the student should learn"
    for a, b in zip(eager, blaze):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    assert "max |eager - blaze| over 6 steps" in capsys.readouterr().out
