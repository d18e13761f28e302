"""The matcher helpers accept every spelling Dynamo uses for one operation, on every torch version."""

from __future__ import annotations

import operator

import torch
import torch.fx

from passes._fx import is_fn


def test_comparisons_match_as_call_function_or_dunder_call_method() -> None:
    # torch 2.11's Dynamo records `ids == e` as call_method("__eq__"); 2.13 as operator.eq.
    g = torch.fx.Graph()
    ids = g.placeholder("ids")
    as_method = g.call_method("__eq__", (ids, 3))
    as_function = g.call_function(operator.eq, (ids, 3))
    lt_method = g.call_method("__lt__", (ids, 3))
    for node in (as_method, as_function):
        assert is_fn(node, operator.eq, torch.eq)
        assert not is_fn(node, operator.ne)
    assert is_fn(lt_method, torch.lt, operator.lt) and not is_fn(lt_method, operator.eq)
    # other call_methods are not functions, whatever their name
    assert not is_fn(g.call_method("eq", (ids, 3)), operator.eq)
    assert not is_fn(g.call_method("__add__", (ids, 3)), operator.add)
    assert not is_fn(ids, operator.eq) and not is_fn(3, operator.eq)


def test_upstream_lists_each_node_once():
    """A chain of diamonds (a residual stream) has 2**depth paths; each node is listed once."""
    from blazec.passes.moe_dispatch import _upstream

    g = torch.fx.Graph()
    n = g.placeholder("x")
    for _ in range(30):
        n = g.call_function(torch.add, (g.call_function(torch.relu, (n,)), g.call_function(torch.sigmoid, (n,))))
    up = _upstream(n, 12)
    assert len(up) == len(set(up)) == 18  # 6 diamonds of 3 nodes
