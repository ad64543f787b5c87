"""Multi-head latent attention (DeepSeek-V3, random weights): the latent cache is scored with the folded
pass-through term and gives the same scores as the paper's equations on the fully expanded per-head keys."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import triattn_compile as tc
from triattn_compile.kernels.scoring.naive import (
    aggregate_scores,
    from_complex_pairs,
    geometric_offsets,
    invert_rope,
    naive_score_prerope,
    to_complex_pairs,
)
from triattn_compile.policies import TriAttention
from triattn_compile.schedule import compaction_inputs

sys.path.insert(0, str(Path(__file__).parent / "passes"))
from test_families import FAMILIES, build  # noqa: E402

BUDGET, DIVIDE, PROMPT = 48, 16, 10
H, NOPE, ROPE, RANK = 4, 16, 8, 32  # the deepseek_v3 row of FAMILIES


@pytest.fixture(scope="module")
def mla():
    """An optimized DeepSeek-V3 holding 40 tokens (no compaction yet) and the plain model's weights."""
    model = build(FAMILIES["deepseek_v3"])
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    tc.optimize(model, budget=BUDGET, divide_length=DIVIDE, compiler="eager")
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    return model


def test_latent_projection_is_the_key_up_projection(mla):
    """The matrix read off the graph by probing equals the k_nope rows of each layer's ``kv_b_proj``."""
    layout = tc.inspect(mla).layout
    assert layout.num_kv_heads == 1 and layout.rotary.rotary_start == NOPE and layout.rotary.key_pairing == "half"
    for i, layer in enumerate(mla.model.layers):
        w = layer.self_attn.kv_b_proj.weight.detach().double().view(H, -1, RANK)[:, :NOPE]  # [H, NOPE, R]
        torch.testing.assert_close(layout.latent_maps[i], w.transpose(1, 2))


def test_statistics_are_the_hooked_pre_rope_queries():
    """Calibration captures ``[q_pe (interleaved pairs) ; q_nope]`` of every head, as a hook on q_b_proj sees it."""
    model = build(FAMILIES["deepseek_v3"])
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.model.layers[1].self_attn.q_b_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(ids[None])
    hook.remove()
    stats = tc.calibrate(model, ids)
    q = seen[0].double().view(40, H, NOPE + ROPE)
    bands = torch.complex(q[..., NOPE::2], q[..., NOPE + 1 :: 2])  # rope_interleave: pairs (2f, 2f + 1)
    torch.testing.assert_close(stats.q_mean()[1], bands.mean(0))
    torch.testing.assert_close(stats.q_abs()[1], bands.abs().mean(0))
    torch.testing.assert_close(stats.q_pass_mean()[1], q[..., :NOPE].mean(0))


def test_latent_scores_equal_the_expanded_reference(mla):
    """TriAttention on ``[k_pe ; c_kv]`` with the folded centre ``W_UKᵀ q̄_nope`` = the paper's pre-RoPE score of
    each head's full key ``[k_nope,h ; k_pe]`` (inverted RoPE, 17 offsets, plus ``q̄_nope · k_nope,h``), aggregated
    over all heads; without the pass-through term the scores differ."""
    compressor, cache = tc.inspect(mla), tc.current_cache(mla)
    inputs = compaction_inputs(cache, compressor)
    stats, layout = compressor.stats, compressor.layout
    policy = TriAttention(noise=0.0)
    got = policy.scores(inputs)[0, 0, 0]  # one KV head: every query head shares the latent
    n, sig = cache.fill[0], layout.signature
    positions = cache.slot_pos[:, 0, 0, :n]
    raw = []
    for i, layer in enumerate(mla.model.layers):
        c = cache.layers[i].keys[0, 0, :n]  # [N, R] latent
        k_nope = layer.self_attn.kv_b_proj(c).view(n, H, -1)[..., :NOPE].transpose(0, 1)  # [H, N, NOPE]
        k_pe = invert_rope(cache.layers[i].values[:, :, :n], positions[i], layout.omega[i], "half")  # [1, 1, N, 8]
        k_pe = from_complex_pairs(to_complex_pairs(k_pe, "half"), "interleaved").expand(1, H, n, ROPE)
        keys_pre = torch.cat([k_pe, k_nope[None].to(k_pe.dtype)], -1)  # [1, H, N, 24]: stats layout
        raw.append(naive_score_prerope(
            keys_pre, positions[i].expand(1, H, n), inputs.next_position, stats.q_mean()[i],
            stats.q_abs()[i], layout.omega[i], sig.pairing, geometric_offsets(), sig.attention_scaling,
            q_pass=stats.q_pass_mean()[i],
        ))
    want = aggregate_scores(torch.stack(raw), 1, inputs.candidates())[0, 0]
    cand = inputs.candidates()
    torch.testing.assert_close(got[cand].double(), want[cand], rtol=1e-4, atol=1e-4)
    inputs.q_pass = None
    without = policy.scores(inputs)[0, 0, 0]
    assert (without[cand].double() - want[cand]).abs().max() > 0.1


def test_observation_policies_are_refused_on_a_latent_cache():
    model = build(FAMILIES["deepseek_v3"])
    with pytest.raises(ValueError, match="latent") as exc:
        tc.optimize(model, budget=BUDGET, divide_length=DIVIDE, compiler="eager", policy="snapkv")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("policy 'snapkv'")


def test_latent_cache_under_inductor():
    """The compiled path (Inductor) gives the unmodified model's greedy tokens while the sequence fits, and stays
    at capacity through a compaction."""
    model = build(FAMILIES["deepseek_v3"])
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
        tc.optimize(model, budget=BUDGET, divide_length=DIVIDE)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=False)
    assert torch.equal(out[:, : ref.shape[1]], ref)  # 40 tokens: they fit the 64 slots
    cache = tc.current_cache(model)
    assert cache.peak_occupancy() == BUDGET + DIVIDE and cache.compactions() >= 1
