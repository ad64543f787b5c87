"""Eviction policies vs straightforward re-implementations of TRIATTENTION.md §6–§7, and the in-graph observation
ops (``kernels/observe.py``) vs queries and attention captured independently from the unmodified model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc
from triattn_compile.kernels.compact import keep_slots
from triattn_compile.kernels.scoring.naive import invert_rope, naive_score_prerope
from triattn_compile.policies import (
    H2O,
    POLICIES,
    RKV,
    CompactionInputs,
    RandomPolicy,
    SnapKV,
    StreamingLLM,
    TriAttention,
    TriAttentionCoverage,
    TriAttentionDistinct,
    TriAttentionDiverse,
    TriAttentionLasting,
    TriAttentionLive,
    TriAttentionObserved,
    TriAttentionPersistent,
    TriAttentionRecent,
    TriAttentionReserve,
    TriAttentionValueNorm,
    make_policy,
)


def synthetic(L=2, B=1, Hkv=2, G=2, N=40, D=8, W=8, seed=0, start=100, protected=0, budget=24
              ) -> CompactionInputs:
    g = torch.Generator().manual_seed(seed)
    F = D // 2
    q_mean = torch.complex(torch.randn(L, Hkv * G, F, generator=g), torch.randn(L, Hkv * G, F, generator=g))
    return CompactionInputs(
        keys=[torch.randn(B, Hkv, N, D, generator=g) for _ in range(L)],
        positions=(start + torch.arange(N)).expand(L, B, Hkv, N).clone(),
        next_position=start + N,
        num_protected=protected,
        round=3,
        q_mean=q_mean,
        q_abs=q_mean.abs() + torch.rand(L, Hkv * G, F, generator=g),
        omega=(1.0 / 10000 ** (torch.arange(F, dtype=torch.float64) / F)).expand(L, F).clone(),
        pairing="half",
        scale=1.0,
        queries=torch.randn(L, B, Hkv * G, W, D, generator=g),
        attention=torch.rand(L, B, Hkv, N, generator=g),
        values=[torch.randn(B, Hkv, N, D, generator=g) * torch.rand(1, Hkv, N, 1, generator=g) for _ in range(L)],
        budget=budget,
    )


# -- loop references, written from the doc's prose -------------------------------------------------------------------
def ref_window_attention(inp: CompactionInputs, layer: int, window: int = 8, kernel: int = 7) -> torch.Tensor:
    keys = inp.keys[layer].double()
    q = inp.queries[layer].double()
    B, Hkv, N, D = keys.shape
    G = q.shape[1] // Hkv
    out = torch.zeros(B, Hkv, N - window, dtype=torch.float64)
    for b in range(B):
        for j in range(Hkv):
            acc = torch.zeros(N - window, dtype=torch.float64)
            for w in range(window):
                logits = torch.tensor([max(float(q[b, j * G + g, w] @ keys[b, j, n]) for g in range(G)) / math.sqrt(D)
                                       for n in range(N - window)], dtype=torch.float64)
                e = torch.exp(logits - logits.max())
                acc += e / e.sum()
            acc /= window
            half = kernel // 2
            out[b, j] = torch.stack([acc[max(0, n - half): n + half + 1].max() for n in range(N - window)])
    return out


def ref_redundancy(keys: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    B, Hkv, N, _ = keys.shape
    out = torch.zeros(B, Hkv, N, dtype=torch.float64)
    for b in range(B):
        for j in range(Hkv):
            k = keys[b, j].double()
            unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
            S = [[0.0 if i == m else float(unit[i] @ unit[m]) for m in range(N)] for i in range(N)]
            for i in range(N):
                similar = [m for m in range(N) if S[i][m] > threshold]
                S[i][max(similar) if similar else 0] = 0.0
            col = torch.tensor([sum(S[i][m] for i in range(N)) / N for m in range(N)], dtype=torch.float64)
            out[b, j] = torch.softmax(col, 0)
    return out


def test_registry_names_and_options():
    assert set(POLICIES) == {"triattention", "triattention-no-trig", "triattention-no-norm", "triattention-no-mlr",
                             "triattention-recent", "triattention-diverse", "triattention-vnorm",
                             "triattention-observed", "triattention-distinct", "triattention-live",
                             "triattention-persistent", "triattention-lasting", "triattention-reserve",
                             "triattention-coverage", "triattention-copy",
                             "streamingllm", "snapkv", "rkv", "h2o", "random"}
    for name, cls in POLICIES.items():
        assert make_policy(name).name == name and isinstance(make_policy(name), cls)
    assert make_policy("triattention-no-mlr", per_layer=True).per_layer
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("nope")


def test_streamingllm_keeps_sinks_and_recent():
    inp = synthetic(N=40, start=0)
    idx = keep_slots(StreamingLLM().scores(inp), 0, StreamingLLM.recent_window, 16)
    want = torch.tensor([0, 1, 2, 3, *range(28, 40)])
    assert (idx == want).all()
    later = synthetic(N=40, start=500)  # sinks already evicted can never come back: plain recency
    assert (keep_slots(StreamingLLM().scores(later), 0, 0, 16) == torch.arange(24, 40)).all()


def test_snapkv_matches_loop_reference():
    inp = synthetic()
    scores = SnapKV().scores(inp)  # [L, B, Hkv, N]
    assert scores.shape == (2, 1, 2, 40) and torch.isinf(scores[..., -8:]).all()
    for layer in range(2):
        torch.testing.assert_close(scores[layer, ..., :-8].double(), ref_window_attention(inp, layer),
                                   rtol=1e-5, atol=1e-7)
        ref = torch.cat([ref_window_attention(inp, layer), torch.full((1, 2, 8), math.inf, dtype=torch.float64)], -1)
        assert (keep_slots(scores[layer], 0, 8, 20) == keep_slots(ref, 0, 8, 20)).all()


def test_rkv_matches_loop_reference():
    inp = synthetic(N=24, D=4)  # small D: many pairs above the 0.5 cosine threshold
    scores = RKV().scores(inp)
    for layer in range(2):
        red = ref_redundancy(inp.keys[layer])
        assert (red > 0).all()
        want = 0.1 * ref_window_attention(inp, layer) - 0.9 * red[..., :-8]
        torch.testing.assert_close(scores[layer, ..., :-8].double(), want, rtol=1e-5, atol=1e-7)
    assert RKV.recent_window == 8 or RKV().recent_window == 8


def test_h2o_scores_are_accumulated_attention():
    inp = synthetic()
    scores = H2O().scores(inp)
    assert torch.equal(scores, inp.attention)
    idx = keep_slots(scores, 0, 8, 20)
    older = inp.attention[..., :-8].topk(12, dim=-1).indices.sort(-1).values
    assert (idx[..., :12] == older).all() and (idx[..., 12:] == torch.arange(32, 40)).all()


def test_random_is_seeded_per_round():
    inp = synthetic()
    a, b = RandomPolicy().scores(inp), RandomPolicy().scores(inp)
    assert torch.equal(a, b) and a.shape == (2, 1, 2, 40)
    inp.round += 1
    assert not torch.equal(a, RandomPolicy().scores(inp))


@pytest.mark.parametrize("name,flags", [
    ("triattention", {}),
    ("triattention-no-trig", {"use_trig": False}),
    ("triattention-no-norm", {"use_norm": False}),
    ("triattention-no-mlr", {"mlr": False}),
])
def test_triattention_ablations_match_prerope_reference(name, flags):
    inp = synthetic(protected=4)
    got = make_policy(name, noise=0.0).scores(inp)[0]  # [B, Hkv, N]
    L, H, Hkv = 2, 4, 2
    raw = torch.stack([
        naive_score_prerope(invert_rope(inp.keys[i].double(), inp.positions[i], inp.omega[i], "half"),
                            inp.positions[i], inp.next_position, inp.q_mean[i], inp.q_abs[i], inp.omega[i], "half",
                            torch.tensor([2.0**e for e in range(17)]), **flags)
        for i in range(L)
    ])  # [L, B, H, N]
    cand = raw[..., 4:]
    z = (raw - cand.mean(-1, keepdim=True)) / cand.std(-1, unbiased=False, keepdim=True)
    want = z.view(L, 1, Hkv, H // Hkv, -1).amax(3).mean(0)
    torch.testing.assert_close(got[..., 4:].double(), want[..., 4:], rtol=1e-4, atol=1e-4)
    if flags:  # the ablation changes the ranking
        full = TriAttention(noise=0.0).scores(inp)[0]
        assert not torch.allclose(full[..., 4:], got[..., 4:], atol=1e-3)


# -- the observation ops on a tiny model ---------------------------------------------------------------------------
def independent_qk(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-RoPE queries ``[B, H, T, D]`` and keys ``[B, Hkv, T, D]`` per layer, recomputed by forward pre-hooks from
    each attention module's inputs (the unmodified model, no cache)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    qs, ks = [], []

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        B, T, _ = h.shape
        d = module.head_dim
        q = module.q_proj(h).view(B, T, -1, d).transpose(1, 2)
        k = module.k_proj(h).view(B, T, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        qs.append(q.detach())
        ks.append(k.detach())

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return qs, ks


def manual_attention_mass(q: torch.Tensor, k: torch.Tensor, first_query: int) -> torch.Tensor:
    """Σ over queries t >= first_query and each GQA group of softmax(q_t k_{<=t}ᵀ / sqrt(D)), ``[B, Hkv, S]``."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for h in range(H):
        for t in range(first_query, T):
            slot = S - T + t  # the query's own slot
            keys = k[:, h // (H // Hkv), : slot + 1].double()  # [B, S', D]
            logits = torch.einsum("bd,bsd->bs", q[:, h, t].double(), keys) / math.sqrt(D)
            out[:, h // (H // Hkv), : slot + 1] += torch.softmax(logits, -1)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_observed_queries_and_attention_match_independent_capture(attn):
    model = tiny_llama(layers=2)
    model.set_attn_implementation(attn)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1))
    q_ref, k_ref = independent_qk(model, ids)

    class Both(H2O):
        query_window = 8

    tc.optimize(model, budget=32, divide_length=16, compiler="eager", policy=Both(), protect_prompt=False)
    with torch.no_grad():
        model(input_ids=ids[None, :12])
        cache = tc.current_cache(model)
        for lo, hi in ((12, 15), (15, 20)):  # a call shorter than the window, then a longer one
            model(input_ids=ids[None, lo:hi], past_key_values=cache)
    assert cache.rounds == 0 and cache.occupied == 20
    for layer in range(2):
        torch.testing.assert_close(cache.queries[layer], q_ref[layer][:, :, -8:], rtol=1e-5, atol=1e-5)
        want = manual_attention_mass(q_ref[layer], k_ref[layer], 0)
        torch.testing.assert_close(cache.attention[layer, :, :, :20].double(), want, rtol=1e-5, atol=1e-5)
        assert (cache.attention[layer, :, :, 20:] == 0).all()


def test_accumulated_attention_after_compaction():
    """After a compaction, a step adds softmax over the kept slots only (queries from the recorded ring)."""
    model = tiny_llama(layers=2)

    class Both(H2O):
        query_window = 8

    tc.optimize(model, budget=16, divide_length=8, compiler="eager", policy=Both(), protect_prompt=False)
    ids = torch.randint(0, 128, (28,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids[None, :24])
        cache = tc.current_cache(model)
        assert cache.rounds == 1 and cache.occupied == 16
        before = cache.attention.clone()
        model(input_ids=ids[None, 24:28], past_key_values=cache)
    for layer in range(2):
        keys = cache.layers[layer].keys[:, :, :20]
        q = cache.queries[layer][:, :, -4:]
        got = (cache.attention[layer] - before[layer])[..., :20].double()
        torch.testing.assert_close(got, manual_attention_mass(q, keys, 0), rtol=1e-5, atol=1e-5)


def manual_distant_mass(q: torch.Tensor, k: torch.Tensor, query_pos: list[int], key_pos: torch.Tensor,
                        min_distance: int) -> torch.Tensor:
    """Loop reference of the distance-filtered sum: for every query head, query ``t`` (at ``query_pos[t]``) and key
    slot ``s`` it sees (``0 <= key_pos <= query_pos``), the softmax over the seen slots, added to ``s`` only when
    ``query_pos[t] - key_pos[s] >= min_distance``; ``[B, Hkv, S]`` float64."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            j = h // (H // Hkv)
            for t in range(T):
                seen = [s for s in range(S) if 0 <= int(key_pos[b, j, s]) <= query_pos[t]]
                logits = torch.stack([q[b, h, t].double() @ k[b, j, s].double() for s in seen]) / math.sqrt(D)
                probs = torch.softmax(logits, 0)
                for i, s in enumerate(seen):
                    if query_pos[t] - int(key_pos[b, j, s]) >= min_distance:
                        out[b, j, s] += probs[i]
    return out


def test_distant_attention_matches_loop_reference_before_and_after_compaction():
    """The in-graph distance filter (``passes/rewrite.py::distant_slots``) sums exactly the probabilities of keys at
    least ``min_distance`` before each query; after a compaction, over the kept slots only, with their positions."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (28,), generator=torch.Generator().manual_seed(6))
    q_ref, k_ref = independent_qk(model, ids[:20])

    class Recording(TriAttentionLasting):
        query_window = 8

    tc.optimize(model, budget=16, divide_length=8, compiler="eager", policy=Recording(min_distance=3),
                protect_prompt=False)
    with torch.no_grad():
        model(input_ids=ids[None, :12])
        cache = tc.current_cache(model)
        model(input_ids=ids[None, 12:15], past_key_values=cache)
        assert cache.rounds == 0
        for layer in range(2):
            want = manual_distant_mass(q_ref[layer][:, :, :15], k_ref[layer][:, :, :15], list(range(15)),
                                       torch.arange(15).expand(1, 2, 15), 3)
            torch.testing.assert_close(cache.distant_attention[layer, :, :, :15].double(), want, rtol=1e-5, atol=1e-6)
            assert (cache.distant_attention[layer, :, :, 15:] == 0).all()
            total = manual_attention_mass(q_ref[layer][:, :, :15], k_ref[layer][:, :, :15], 0)
            torch.testing.assert_close(cache.attention[layer, :, :, :15].double(), total, rtol=1e-5, atol=1e-6)
        model(input_ids=ids[None, 15:24], past_key_values=cache)
        assert cache.rounds == 1 and cache.occupied == 16
        before = cache.distant_attention.clone()
        model(input_ids=ids[None, 24:28], past_key_values=cache)
    for layer in range(2):
        got = (cache.distant_attention[layer] - before[layer])[..., :20].double()
        want = manual_distant_mass(cache.queries[layer][:, :, -4:], cache.layers[layer].keys[:, :, :20],
                                   list(range(24, 28)), cache.slot_pos[layer, :, :, :20], 3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def ref_lasting(inp: CompactionInputs, min_distance: int) -> torch.Tensor:
    """Per slot: the distance-filtered sum divided by the number of queries at least ``min_distance`` after it
    (counted one by one), NaN where there is none."""
    out = torch.full(inp.distant_attention.shape, float("nan"), dtype=torch.float64)
    L, B, Hkv, N = out.shape
    for i in range(L):
        for b in range(B):
            for j in range(Hkv):
                for n in range(N):
                    pos = int(inp.positions[i, b, j, n])
                    count = sum(1 for query in range(inp.next_position) if query - pos >= min_distance)
                    if count:
                        out[i, b, j, n] = float(inp.distant_attention[i, b, j, n]) / count
    return out


@pytest.mark.parametrize("per_layer", [True, False])
def test_lasting_variant_matches_loop_reference_and_caps_the_protected_newest(per_layer):
    inp = synthetic(protected=3)
    inp.positions = inp.positions.flip(-1).contiguous()  # slot order is not time order (vLLM's hole filling)
    inp.distant_attention = inp.attention * torch.rand(inp.attention.shape, generator=torch.Generator().manual_seed(9))
    mean = ref_lasting(inp, 5)
    newest = mean.isnan()
    assert (newest == (inp.positions > inp.next_position - 1 - 5)).all() and newest.sum() == 2 * 2 * 5
    logs = torch.where(newest, torch.nanmean(mean, -1, keepdim=True), mean).log()
    cand = torch.arange(logs.shape[-1]) >= 3
    z = (logs - logs[..., cand].mean(-1, keepdim=True)) / logs[..., cand].std(-1, unbiased=False, keepdim=True)
    want = TriAttention(noise=0.0, per_layer=per_layer).scores(inp).double() + 0.7 * (z if per_layer else z.mean(0))
    got = TriAttentionLasting(weight=0.7, min_distance=5, per_layer=per_layer, noise=0.0).scores(inp).double()
    assert got.shape[0] == (2 if per_layer else 1)
    protected = newest[: got.shape[0]]
    assert (torch.isinf(got) == protected).all()
    torch.testing.assert_close(got[~protected & cand], want[~protected & cand], rtol=1e-4, atol=1e-4)
    inp.budget = 6  # at most half the budget is protected, whatever min_distance
    capped = TriAttentionLasting(min_distance=5).scores(inp)
    assert (torch.isinf(capped) == (inp.positions >= inp.next_position - 3)).all()
    assert TriAttentionLasting().per_layer and TriAttentionLasting().distant_attention == 128
    assert TriAttentionLasting.accumulate_attention  # what the vLLM plugin refuses (no live attention there)
    with pytest.raises(ValueError, match="min_distance"):
        TriAttentionLasting(min_distance=0)


def _lasting_case() -> tuple[CompactionInputs, torch.Tensor]:
    """32 slots (2 protected), budget 16, distant attention recorded; and (h)'s scores with distance 5 (the newest 5
    at +inf)."""
    inp = synthetic(N=32, D=4, protected=2, budget=16)
    inp.distant_attention = inp.attention * torch.rand(inp.attention.shape, generator=torch.Generator().manual_seed(9))
    return inp, TriAttentionLasting(min_distance=5, noise=0.0).scores(inp)


def _ref_rkv(inp: CompactionInputs, layer: int) -> torch.Tensor:
    """R-KV's score of the slots before its 8-query window, from the loop references: ``[1, Hkv, N - 8]``."""
    return 0.1 * ref_window_attention(inp, layer) - 0.9 * ref_redundancy(inp.keys[layer])[..., :-8]


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_reserve_variant_gives_a_share_of_the_budget_to_rkv_and_the_rest_to_lasting(share):
    inp, lasting = _lasting_case()
    got = TriAttentionReserve(share=share, min_distance=5, noise=0.0).scores(inp)
    assert got.shape == lasting.shape == (2, 1, 2, 32)
    reserve = int(share * 16)
    for layer in range(2):
        rkv = _ref_rkv(inp, layer)
        for head in range(2):
            free = [n for n in range(2, 24) if not torch.isinf(lasting[layer, 0, head, n])]
            picked = sorted(free, key=lambda n: -float(rkv[0, head, n]))[:reserve]
            want = lasting[layer, 0, head].clone()
            want[picked] = torch.inf
            assert torch.equal(got[layer, 0, head], want), (layer, head)
    assert int(torch.isinf(got).sum()) == int(torch.isinf(lasting).sum()) + 2 * 2 * reserve
    assert TriAttentionReserve().distant_attention == 128 and TriAttentionReserve().query_window == 8
    with pytest.raises(ValueError, match="share"):
        TriAttentionReserve(share=0.75)


@pytest.mark.parametrize("coverage", [0.3, 0.6, 1.0])
def test_coverage_variant_splits_the_budget_per_head_by_the_lasting_attention_it_covers(coverage):
    inp, lasting = _lasting_case()
    got = TriAttentionCoverage(coverage=coverage, min_distance=5, noise=0.0).scores(inp)
    assert got.shape == lasting.shape == (2, 1, 2, 32)
    splits = set()
    for layer in range(2):
        rkv = _ref_rkv(inp, layer)
        for head in range(2):
            newest = [n for n in range(2, 32) if torch.isinf(lasting[layer, 0, head, n])]
            older = [n for n in range(2, 32) if n not in newest]
            mean = {n: float(inp.distant_attention[layer, 0, head, n]) / (132 - (100 + n) - 5) for n in older}
            heaviest = sorted(older, key=lambda n: -mean[n])
            total, held, k = sum(mean.values()), 0.0, 0
            while held < coverage * total and k < len(heaviest):
                held, k = held + mean[heaviest[k]], k + 1
            k = min(k, 16 - 2 - len(newest))
            splits.add(k)
            kept = set(newest) | set(heaviest[:k])
            row = got[layer, 0, head]
            assert {n for n in range(32) if row[n] == torch.inf} == kept, (layer, head)
            for n in range(32):
                if n not in kept:
                    want = float(rkv[0, head, n]) if 2 <= n < 24 else -torch.inf
                    assert float(row[n]) == pytest.approx(want, rel=1e-5), (layer, head, n)
    assert len(splits) > 1 or coverage == 1.0  # the split differs from head to head
    with pytest.raises(ValueError, match="coverage"):
        TriAttentionCoverage(coverage=0.0)


def test_lasting_generates_a_left_padded_batch_like_each_prompt_alone(tmp_path):
    """End to end: compressed greedy generation with the lasting policy (several compactions, rows on their own
    schedules): padding is never counted, and the distance-filtered sums move with the kept slots."""
    model = tiny_llama(layers=2)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in (5, 11)]
    stats = tc.calibrate(model, torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(4)))
    tc.optimize(model, budget=8, divide_length=4, compiler="eager", policy=TriAttentionLasting(min_distance=4),
                stats=stats.save(tmp_path / "stats.safetensors"), protect_prompt=False)

    def greedy(ids, mask):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)

    alone = []
    for p in prompts:
        alone.append(greedy(p[None], torch.ones(1, len(p), dtype=torch.long))[0, len(p):])
        cache = tc.current_cache(model)
        assert cache.compactions() >= 3
        seen = cache.tokens_seen()
        pos, far = cache.slot_pos[..., :8], cache.distant_attention[..., :8]
        # moved with its slot: nothing yet from a distant query for the newest, something for every older one
        assert ((far == 0) == (pos > seen - 1 - 4)).all()
        assert (far <= cache.attention[..., :8] + 1e-6).all()
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, 6:], mask[0, 6:], ids[1], mask[1] = prompts[0], 1, prompts[1], 1
    batched = greedy(ids, mask)[:, 11:]
    for i, tokens in enumerate(alone):
        assert torch.equal(batched[i], tokens), i


def test_recent_variant_keeps_window_and_sinks_and_ranks_the_rest_like_triattention():
    inp = synthetic(N=40, start=0, budget=24)
    base = TriAttention(noise=0.0).scores(inp)
    got = TriAttentionRecent(window=8, sinks=4, noise=0.0).scores(inp)
    assert torch.isinf(got[..., :4]).all() and torch.isinf(got[..., -8:]).all()
    assert torch.equal(got[..., 4:-8], base[..., 4:-8])
    assert torch.isinf(TriAttentionRecent(window=100, sinks=0, noise=0.0).scores(inp)).sum() == 2 * 12  # budget // 2
    later = synthetic(N=40, start=500)  # sinks already evicted never come back
    assert torch.isinf(TriAttentionRecent(window=8, sinks=4, noise=0.0).scores(later)).sum() == 2 * 8


def ref_greedy_diverse(scores: torch.Tensor, values: list[torch.Tensor], keep: int, penalty: float,
                       protected: set) -> list[list[int]]:
    """Per KV head: the slots the greedy picks, from the prose (cosine of layer-concatenated unit values / L)."""
    Hkv, N = scores.shape[-2:]
    out = []
    for h in range(Hkv):
        units = [[v[0, h, n].double() / v[0, h, n].double().norm() for v in values] for n in range(N)]
        sim = [[sum(float(a @ b) for a, b in zip(units[i], units[j])) / len(values) for j in range(N)]
               for i in range(N)]
        chosen = sorted(protected)
        while len(chosen) < keep:
            gains = {i: float(scores[0, 0, h, i]) - penalty * max([0.0] + [sim[i][j] for j in chosen])
                     for i in range(N) if i not in chosen}
            chosen.append(max(gains, key=gains.get))
        out.append(sorted(chosen))
    return out


@pytest.mark.parametrize("penalty", [0.0, 0.7, 5.0])
def test_diverse_variant_matches_loop_reference(penalty):
    inp = synthetic(N=30, protected=2, budget=12)
    got = TriAttentionDiverse(penalty=penalty, noise=0.0).scores(inp)  # [1, B, Hkv, N]
    idx = keep_slots(got, inp.num_protected, 0, inp.budget)
    base = TriAttention(noise=0.0).scores(inp)
    want = ref_greedy_diverse(base, inp.values, inp.budget, penalty, {0, 1})
    assert idx[0, 0].tolist() == want
    plain = keep_slots(base, inp.num_protected, 0, inp.budget)[0, 0].tolist()
    assert (want == plain) == (penalty == 0.0)  # no penalty: TriAttention's own keep set


def test_value_norm_variant_adds_layer_mean_of_zscored_log_norms():
    inp = synthetic(protected=3)
    got = TriAttentionValueNorm(weight=0.5, noise=0.0).scores(inp)
    logn = torch.stack([v.double().norm(dim=-1).log() for v in inp.values])[..., 3:]  # [L, B, Hkv, N - 3]
    z = (logn - logn.mean(-1, keepdim=True)) / logn.std(-1, unbiased=False, keepdim=True)
    want = TriAttention(noise=0.0).scores(inp)[..., 3:].double() + 0.5 * z.mean(0)
    torch.testing.assert_close(got[..., 3:].double(), want, rtol=1e-5, atol=1e-5)


def test_observed_variant_adds_layer_mean_of_zscored_log_attention_per_query():
    inp = synthetic(protected=3)
    got = TriAttentionObserved(weight=0.7, noise=0.0).scores(inp)
    age = (inp.next_position - inp.positions).double()  # [L, B, Hkv, N]
    rec = (inp.attention.double() / age).log()[..., 3:]
    z = (rec - rec.mean(-1, keepdim=True)) / rec.std(-1, unbiased=False, keepdim=True)
    want = TriAttention(noise=0.0).scores(inp)[..., 3:].double() + 0.7 * z.mean(0)
    torch.testing.assert_close(got[..., 3:].double(), want, rtol=1e-5, atol=1e-5)
    assert TriAttentionObserved.accumulate_attention and not TriAttention.accumulate_attention


def test_distinct_variant_subtracts_layer_mean_of_zscored_log_key_redundancy():
    inp = synthetic(protected=3)
    got = TriAttentionDistinct(weight=0.6, noise=0.0).scores(inp)
    red = torch.stack([ref_redundancy(k).log() for k in inp.keys])[..., 3:]  # [L, B, Hkv, N - 3]
    z = (red - red.mean(-1, keepdim=True)) / red.std(-1, unbiased=False, keepdim=True)
    want = TriAttention(noise=0.0).scores(inp)[..., 3:].double() - 0.6 * z.mean(0)
    torch.testing.assert_close(got[..., 3:].double(), want, rtol=1e-4, atol=1e-4)
    per_layer = TriAttentionDistinct(weight=0.6, noise=0.0, per_layer=True).scores(inp)
    assert per_layer.shape[0] == len(inp.keys) and got.shape[0] == 1


def ref_interval_attention(inp: CompactionInputs, layer: int) -> torch.Tensor:
    keys, q = inp.keys[layer].double(), inp.queries[layer].double()  # [B, Hkv, N, D], [B, H, W, D]
    B, Hkv, N, D = keys.shape
    W, G = q.shape[2], q.shape[1] // Hkv
    out = torch.zeros(B, Hkv, N, dtype=torch.float64)
    for b in range(B):
        for j in range(Hkv):
            per_head = []
            for g in range(G):
                acc = torch.zeros(N, dtype=torch.float64)
                for w in range(W):
                    seen = [n for n in range(N) if inp.positions[layer, b, j, n] <= inp.next_position - W + w]
                    logits = torch.stack([q[b, j * G + g, w] @ keys[b, j, n] for n in seen]) / math.sqrt(D)
                    acc[seen] += torch.softmax(logits, 0)
                per_head.append(acc / W)
            out[b, j] = torch.stack(per_head).amax(0)
    return out


def test_live_variant_adds_layer_mean_of_zscored_log_interval_attention():
    inp = synthetic(protected=3)
    inp.positions = inp.positions.flip(-1).contiguous()  # slot order is not time order (vLLM's hole filling)
    live = torch.stack([ref_interval_attention(inp, i) for i in range(len(inp.keys))])  # [L, B, Hkv, N]
    assert (live[..., inp.positions[0, 0, 0] >= inp.next_position - 8] > 0).all()  # the newest keys were seen
    red = live.log()[..., 3:]
    z = (red - red.mean(-1, keepdim=True)) / red.std(-1, unbiased=False, keepdim=True)
    got = TriAttentionLive(weight=0.8, noise=0.0).scores(inp)
    want = TriAttention(noise=0.0).scores(inp)[..., 3:].double() + 0.8 * z.mean(0)
    torch.testing.assert_close(got[..., 3:].double(), want, rtol=1e-4, atol=1e-4)
    assert TriAttentionLive.query_window == 128 and TriAttentionLive(per_layer=True).scores(inp).shape[0] == 2


def ref_distant_attention(inp: CompactionInputs, layer: int, min_distance: int) -> torch.Tensor:
    """Mean attention from the recorded queries at least ``min_distance`` after each key, max over the group; NaN
    where no such query saw the key."""
    keys, q = inp.keys[layer].double(), inp.queries[layer].double()
    B, Hkv, N, D = keys.shape
    W, G = q.shape[2], q.shape[1] // Hkv
    out = torch.full((B, Hkv, N), float("nan"), dtype=torch.float64)
    for b in range(B):
        for j in range(Hkv):
            for n in range(N):
                means = []
                for g in range(G):
                    got = []
                    for w in range(W):
                        qpos = inp.next_position - W + w
                        seen = [m for m in range(N) if inp.positions[layer, b, j, m] <= qpos]
                        if qpos - inp.positions[layer, b, j, n] < min_distance:
                            continue
                        logits = torch.stack([q[b, j * G + g, w] @ keys[b, j, m] for m in seen]) / math.sqrt(D)
                        got.append(torch.softmax(logits, 0)[seen.index(n)])
                    if got:
                        means.append(torch.stack(got).mean())
                if means:
                    out[b, j, n] = torch.stack(means).max()
    return out


def test_persistent_variant_scores_attention_from_distant_queries_and_keeps_the_newest():
    inp = synthetic(protected=3)
    inp.positions = inp.positions.flip(-1).contiguous()
    far = torch.stack([ref_distant_attention(inp, i, 4) for i in range(len(inp.keys))])  # [L, B, Hkv, N]
    newest = far.isnan()
    assert newest.any() and (newest == (inp.positions > inp.next_position - 1 - 4)).all()
    logs = torch.where(newest, far.nanmean(-1, keepdim=True), far).log()
    cand = torch.arange(far.shape[-1]) >= 3
    z = (logs - logs[..., cand].mean(-1, keepdim=True)) / logs[..., cand].std(-1, unbiased=False, keepdim=True)
    want = TriAttention(noise=0.0).scores(inp).double() + 0.7 * z.mean(0)
    got = TriAttentionPersistent(weight=0.7, min_distance=4, per_layer=False, noise=0.0).scores(inp).double()
    assert torch.isinf(got[newest[:1]]).all()
    compared = ~newest[:1] & cand
    torch.testing.assert_close(got[compared], want[compared], rtol=1e-4, atol=1e-4)
    assert TriAttentionPersistent(min_distance=4).scores(inp).shape[0] == len(inp.keys)  # per layer by default
    inp.budget = 6  # at most half the budget is protected, whatever min_distance
    capped = TriAttentionPersistent(min_distance=4).scores(inp)
    assert (torch.isinf(capped) == (inp.positions >= inp.next_position - 3)).all()


def test_every_policy_runs_the_schedule():
    """Each registered policy under the same compiled graph (the harness's switch): bounded cache, temporal order,
    and its recent window / sinks survive four compactions."""
    from triattn_compile.evaluation.harness import PolicySwitch

    model = tiny_llama(layers=1)
    switch = PolicySwitch()
    tc.optimize(model, budget=16, divide_length=8, compiler="eager", policy=switch, protect_prompt=False)
    ids = torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(3))
    for name in sorted(POLICIES):
        switch.inner = make_policy(name)
        with torch.no_grad():
            out = model(input_ids=ids[None, :24])
            cache = tc.current_cache(model)
            for lo in range(24, 48, 8):
                out = model(input_ids=ids[None, lo:lo + 8], past_key_values=cache)
        assert torch.isfinite(out.logits).all()
        assert cache.rounds == 4 and cache.occupied == 16 and cache.peak_occupancy() == 24
        pos = cache.slot_pos[..., :16]
        assert (pos.diff(dim=-1) > 0).all(), name  # temporal order kept
        recent = switch.inner.recent_window
        if recent:
            assert (pos[..., -recent:] == torch.arange(48 - recent, 48)).all(), name
        if name == "streamingllm":
            assert (pos[..., :4] == torch.arange(4)).all() and (pos[..., 4:] == torch.arange(36, 48)).all()


def test_policy_named_in_the_config_keeps_its_own_defaults():
    """``optimize(policy="triattention-lasting")`` leaves ``per_layer`` unset (``None``), so each policy keeps the
    default it was chosen with (per layer for persistent and lasting, shared for TriAttention); a value given wins."""
    from triattn_compile.config import TriAttentionConfig
    from triattn_compile.policies import make_policy

    assert TriAttentionConfig().per_layer is None
    assert make_policy("triattention", per_layer=None).per_layer is False
    assert make_policy("triattention-lasting", per_layer=None).per_layer is True
    assert make_policy("triattention-persistent", per_layer=None, noise=None).per_layer is True
    assert make_policy("triattention-lasting", per_layer=False).per_layer is False
