"""The partition report counts saved bytes by storage, as the checkpoint plan does."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from blazec.partition import saved_tensor_report


def _report(f, *inputs):
    rep = saved_tensor_report(make_fx(f, tracing_mode="fake")(*inputs), 1, "test")
    return rep, {s.name: s for s in rep.saved}


def test_views_of_one_unsaved_base_keep_the_base_once():
    def f(x, w):
        m = torch.mm(x, w)  # [4, 8] fp32 = 128 B, not saved itself
        return m.sum(), m[:, :2], m.t()

    rep, by_name = _report(f, torch.randn(4, 3), torch.randn(3, 8))
    small, full = by_name["slice_1"], by_name["t"]
    assert (small.bytes, small.keeps, small.view_of) == (128, "mm", "")  # keeps all of mm alive
    assert full.view_of == "mm" and not full.keeps
    assert rep.activation_bytes == 128
    assert "view keeping all of mm" in "\n".join(rep.lines())


def test_a_saved_base_owns_its_views_and_an_input_view_is_free():
    def f(x, w):
        m = torch.mm(x, w)
        return m.sum(), m, m.t(), x.t()

    rep, by_name = _report(f, torch.randn(4, 3), torch.randn(3, 8))
    assert by_name["mm"].view_of == "" and by_name["t"].view_of == "mm"
    assert by_name["t_1"].view_of == "input x_1"
    assert rep.activation_bytes == 128
