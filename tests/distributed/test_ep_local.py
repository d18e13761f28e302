"""The local (no-communication) pieces of expert parallelism against brute force."""

from __future__ import annotations

import pytest
import torch

from blazec.expert_parallel import ep_plan, ep_rows, kept_pairs, local_route


def _plan(ids, keep, n_local, world):
    """ep_plan, then ep_rows with this rank's own counts as the exchanged in_splits."""
    dest, present, counts = ep_plan(ids, keep, n_local, world)
    send_tok, send_ids, mine = ep_rows(ids, dest, present, counts.tolist(), n_local)
    return send_tok, send_ids, mine, counts


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("world, n_local, k", [(2, 4, 2), (4, 2, 3), (3, 1, 1), (4, 4, 8)])
def test_ep_plan_sends_each_token_once_per_owning_rank(seed, world, n_local, k):
    g = torch.Generator().manual_seed(seed)
    T, E = 11, world * n_local
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    keep = torch.rand(T, k, generator=g) > 0.3 if seed % 2 else None
    send_tok, send_ids, mine, counts = _plan(ids, keep, n_local, world)

    want_tok, want_ids, want_mine, want_counts = [], [], [], [0] * world
    for r in range(world):  # rank-major, tokens in order, a token at most once per rank
        for t in range(T):
            owned = [bool((ids[t, j] // n_local == r) and (keep is None or keep[t, j])) for j in range(k)]
            if any(owned):
                want_tok.append(t)
                want_mine.append(owned)
                want_ids.append([int(ids[t, j]) - r * n_local if o else n_local for j, o in enumerate(owned)])
                want_counts[r] += 1
    assert send_tok.tolist() == want_tok
    assert send_ids.tolist() == want_ids
    assert mine.tolist() == want_mine
    assert counts.tolist() == want_counts


def test_ep_plan_empty_chunk():
    send_tok, send_ids, mine, counts = _plan(torch.zeros(0, 2, dtype=torch.int64), None, 2, 2)
    assert send_tok.numel() == 0 and send_ids.shape == (0, 2) and counts.tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_local_route_marks_sink_slots_dropped(seed):
    """Sink slots (id n_local) look exactly like moe_route's dropped pairs."""
    g = torch.Generator().manual_seed(seed)
    n_local, T, k = 3, 9, 2
    rids = torch.randint(0, n_local + 1, (T, k), generator=g)
    sorted_pairs, offsets, pair_pos = local_route(rids, n_local)
    flat = rids.flatten().tolist()
    kept = [p for e in range(n_local) for p in range(T * k) if flat[p] == e]
    assert sorted_pairs.tolist() == kept + [-1] * (T * k - len(kept))
    assert offsets.tolist() == [sum(1 for v in flat if v < e) for e in range(n_local + 1)]
    assert pair_pos.tolist() == [kept.index(p) if flat[p] < n_local else -1 for p in range(T * k)]


def test_local_route_is_a_marked_route_eager_and_compiled():
    """Its outputs carry moe_route's mark, so moe_experts reads them without a host check (a
    sync per chunk on a GPU); compiled, it stays one op (fake sizes from rids) and its outputs
    reach moe_experts marked."""
    from blazec.ops.route import is_marked_route

    rids = torch.tensor([[0, 3], [2, 1], [3, 3], [1, 0]])
    route = local_route(rids, 3)
    assert is_marked_route(*route)
    seen = []

    def f(r):
        out = local_route(r, 3)
        return out[0] + 0, out[1] * 1, out[2] - 0, out

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (4, 7):
        r = torch.randint(0, 4, (rows, 2))
        *derived, out = compiled(r)
        seen.append(is_marked_route(*out))
        for got, want in zip(derived, local_route(r, 3)):
            assert torch.equal(got, want)
    assert seen == [True, True]


def test_kept_pairs_matches_the_capacity_route():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # capacity 2, token priority: expert 0 keeps tokens 0 and 1, drops 2 and 3's slot 1
    assert kept_pairs(ids, 3, 2, "token").tolist() == [[True, True], [True, True], [False, True], [False, False]]


# ---------------------------------------------------------------------------------------
# sm_free_comm: what it turns on, and the one-line notice otherwise

from blazec import expert_parallel as ep  # noqa: E402

NCCL = ep.EPGroup("0", 0, 2, "nccl")
needs_low_contention = pytest.mark.skipif(
    not ep._torch_has_low_contention(),
    reason=f"torch {torch.__version__} has no Inductor copy-engine collectives (torch >= 2.13)")


def test_sm_free_on_gloo_falls_back_with_a_notice():
    patches, msg = ep.sm_free_plan(ep.EPGroup("0", 0, 2, "gloo"), "inductor")
    assert patches == {}
    assert msg == ("blazec: sm_free_comm: using ordinary collectives: needs CUDA and the NCCL backend "
                   "(group backend is 'gloo')")
    assert ep.sm_free_plan(None, "inductor")[1].endswith("torch.distributed is not initialized")


@needs_low_contention
def test_sm_free_on_cuda_nccl_turns_on_torch_copy_engine_collectives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    patches, msg = ep.sm_free_plan(NCCL, "inductor")
    assert patches == {"aten_distributed_optimizations.enable_low_contention_collectives": True}
    assert "all_to_all has no copy-engine variant" in msg and "\n" not in msg
    # not through the eager final stage
    assert ep.sm_free_plan(NCCL, "eager")[0] == {}


def test_sm_free_on_a_torch_without_copy_engine_collectives_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ep, "_torch_has_low_contention", lambda: False)
    patches, msg = ep.sm_free_plan(NCCL, "inductor")
    assert patches == {} and "has no copy-engine collectives" in msg and "\n" not in msg


@needs_low_contention
def test_backend_passes_the_sm_free_patch_to_inductor(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = {}

    def spy(gm, inputs, config_patches=None, **kw):  # what blaze hands Inductor; Inductor itself is not run
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", spy)
    monkeypatch.setattr(ep, "sm_free_plan", lambda group, stage: ({ep.LOW_CONTENTION_KEY: True}, "blazec: test"))
    torch._dynamo.reset()
    out = torch.compile(lambda x: x * 2, backend="blaze", options={"sm_free_comm": True})(torch.ones(3))
    assert out.tolist() == [2.0, 2.0, 2.0]
    assert seen.get(ep.LOW_CONTENTION_KEY) is True


def test_sync_grads_needs_a_compiled_expert_parallel_model():
    with pytest.raises(ep.ExpertParallelError, match="expert_parallel needs torch.distributed initialized"):
        ep.sync_grads(torch.nn.Linear(2, 2))
