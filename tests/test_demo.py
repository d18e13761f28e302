"""``blazec demo`` prints its side-by-side table with matching numbers."""

import io

from blazec import demo
from blazec.cli import main


def test_demo_small_eager_stage():
    buf = io.StringIO()
    res = demo.run(tokens=96, d=16, inter=24, num_experts=4, top_k=2, steps=1, final_stage="eager", stream=buf)
    text = buf.getvalue()
    for row in ("max abs error, output", "max abs error, gradients", "time per train step", "bytes saved for backward"):
        assert row in text
    assert res["rewrites"] == 1 and "MATCH static_loop_modulelist" in text
    assert res["out_err"] < 1e-5 and res["grad_err"] < 1e-5
    assert 0 < res["blaze_saved"] < res["eager_saved"]


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--top-k", "9", "--experts", "4"]) == 2
    assert "--top-k (9) cannot exceed --experts (4)" in capsys.readouterr().err
