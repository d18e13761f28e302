"""BLAZEC_TEST_SHARD=i/n splits a test run over n processes (scripts/gpu_check.sh uses it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, in_shard, parse_shard


def test_parse_shard_accepts_i_of_n_and_names_bad_specs() -> None:
    assert parse_shard("0/8") == (0, 8) and parse_shard("7/8") == (7, 8) and parse_shard("0/1") == (0, 1)
    for bad in ("8/8", "-1/4", "1/0", "3", "a/b", "1/2/3", ""):
        with pytest.raises(ValueError, match="BLAZEC_TEST_SHARD"):
            parse_shard(bad)


def test_shards_partition_the_tests() -> None:
    for n in (1, 3, 8):
        owners = [[i for i in range(n) if in_shard(j, (i, n))] for j in range(50)]
        assert all(len(o) == 1 for o in owners)  # every test in exactly one shard


def _collected(env_shard: str | None) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "BLAZEC_TEST_SHARD"}
    if env_shard is not None:
        env["BLAZEC_TEST_SHARD"] = env_shard
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/test_config.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    return r.returncode, ids + ([r.stderr] if r.returncode not in (0, 5) else [])


def test_shards_of_a_real_collection_are_disjoint_and_cover_it() -> None:
    rc, whole = _collected(None)
    assert rc == 0 and len(whole) > 3
    parts = [_collected(f"{i}/3")[1] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert all(parts)


def test_a_malformed_shard_is_a_usage_error() -> None:
    rc, out = _collected("3/3")
    assert rc == 4 and "need n >= 1 and 0 <= i < n" in out[-1]
