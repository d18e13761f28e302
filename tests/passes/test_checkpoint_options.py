"""The ``memory_budget`` and solver options: parsing, errors that name the key, cache keys."""

from __future__ import annotations

import pytest

from blazec.config import BlazeConfig, BlazeOptionError


@pytest.mark.parametrize(
    "value, parsed",
    [
        (None, None),
        (0.6, 0.6),
        (0.0, 0.0),
        (1.0, 1.0),
        ("60%", 0.6),
        ("0.25", 0.25),
        (2**31, 2**31),
        (0, 0),
        ("1000", 1000),
        ("2GiB", 2 * 2**30),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("512MB", 512 * 10**6),
        ("64 KiB", 64 * 1024),
        ("1e9B", 10**9),
        ("3tb", 3 * 10**12),
    ],
)
def test_memory_budget_values(value, parsed):
    got = BlazeConfig.from_options({"memory_budget": value}).memory_budget
    assert got == parsed and type(got) is type(parsed)


@pytest.mark.parametrize(
    "value, words",
    [
        ("2XB", "unknown unit 'XB'"),
        (-1, "bytes must be >= 0"),
        (1.5, "must be within [0.0, 1.0]"),
        (-0.1, "must be within [0.0, 1.0]"),
        (float("nan"), "must be within [0.0, 1.0]"),
        ("150%", "within 0%..100%"),
        ("1.5", "must be within [0.0, 1.0]"),
        ("lots", "cannot parse 'lots'"),
        (True, "must not be a bool"),
        ([1], "must be a number or a string"),
    ],
)
def test_bad_memory_budget_names_the_key(value, words):
    with pytest.raises(BlazeOptionError) as e:
        BlazeConfig.from_options({"memory_budget": value})
    assert "'memory_budget'" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "key, value",
    [("checkpoint_solver", "dp"), ("checkpoint_solver", None), ("checkpoint_time_limit", 0),
     ("checkpoint_time_limit", -2.0), ("checkpoint_time_limit", "5"), ("checkpoint_time_limit", True)],
)
def test_bad_solver_options_name_the_key(key, value):
    with pytest.raises(BlazeOptionError, match=repr(key)):
        BlazeConfig.from_options({key: value})


def test_defaults_and_docs():
    cfg = BlazeConfig.from_options({})
    assert cfg.memory_budget is None and cfg.checkpoint_solver == "auto" and cfg.checkpoint_time_limit == 5.0
    for key in ("memory_budget", "checkpoint_solver", "checkpoint_time_limit"):
        assert key in BlazeConfig.valid_keys() and f"{key}:" in BlazeConfig.__doc__


def test_budget_changes_the_cache_key():
    """Inductor caches by the partitioner's uuid, which hashes the options: two budgets must
    never share a compiled artifact."""
    from blazec.backend import BlazePartitioner

    a = BlazePartitioner(BlazeConfig.from_options({"memory_budget": 0.5}), None).uuid()
    b = BlazePartitioner(BlazeConfig.from_options({"memory_budget": 0.4}), None).uuid()
    c = BlazePartitioner(BlazeConfig.from_options({"memory_budget": "1GiB"}), None).uuid()
    d = BlazePartitioner(BlazeConfig.from_options({"memory_budget": 0.5, "checkpoint_solver": "heuristic"}), None).uuid()
    assert len({a, b, c, d}) == 4
