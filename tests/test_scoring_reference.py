"""The paper's pre-RoPE score and the post-RoPE form agree (scores and keep sets), and match an independent oracle."""

from __future__ import annotations

import pytest
import torch
from independent_reference import independent_keep_sets

from triattn_compile.kernels.compact import keep_slots
from triattn_compile.kernels.scoring.naive import (
    PAIRINGS,
    aggregate_scores,
    apply_rope,
    fold_query_stats,
    geometric_offsets,
    invert_rope,
    naive_score_prerope,
    score_postrope,
    select_keep,
)
from triattn_compile.policies import CompactionInputs, TriAttention

REL_TOL = 1e-5  # max |post - pre| / max |pre|; float32 keys against the float64 oracle


def _random_setup(B=2, Hkv=3, G=3, N=200, D=64, theta=10000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = D // 2
    omega = theta ** (-torch.arange(F, dtype=torch.float64) * 2 / D)
    keys_pre = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 8000, (B, Hkv, N), generator=g)
    q_mean = torch.complex(torch.randn(Hkv * G, F, generator=g, dtype=torch.float64),
                           torch.randn(Hkv * G, F, generator=g, dtype=torch.float64))
    q_abs = q_mean.abs() + torch.rand(Hkv * G, F, generator=g, dtype=torch.float64)
    return keys_pre, positions, q_mean, q_abs, omega


def test_geometric_offsets_are_the_papers_17():
    off = geometric_offsets()
    assert off.tolist() == [2.0**i for i in range(17)]


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scale", [1.0, 1.2])
@pytest.mark.parametrize("G", [1, 3])
def test_rope_inverse(pairing, scale, G):
    keys_pre, positions, *_, omega = _random_setup(G=G)
    rot = apply_rope(keys_pre, positions, omega, pairing, scale)
    torch.testing.assert_close(invert_rope(rot, positions, omega, pairing, scale), keys_pre)


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scale", [1.0, 1.2])  # 1.2: a RoPE with an attention-scaling factor (YaRN mscale)
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("ablation", [{}, {"use_trig": False}, {"use_norm": False}, {"mlr": False}])
def test_postrope_scores_equal_prerope(pairing, scale, G, ablation):
    keys_pre, positions, q_mean, q_abs, omega = _random_setup(G=G)
    offsets = geometric_offsets()
    round_start = 8100
    pre = naive_score_prerope(
        keys_pre, positions, round_start, q_mean, q_abs, omega, pairing, offsets, scale, **ablation
    )
    keys_rot = apply_rope(keys_pre, positions, omega, pairing, scale).float()
    folded = fold_query_stats(round_start, q_mean, q_abs, omega, pairing, offsets, scale, **ablation)
    post = score_postrope(keys_rot, folded)
    err = (post.double() - pre).abs().max() / pre.abs().max()
    assert err < REL_TOL, f"relative error {err:.2e}"


def test_wrong_pairing_is_detected():
    keys_pre, positions, q_mean, q_abs, omega = _random_setup()
    offsets = geometric_offsets()
    pre = naive_score_prerope(keys_pre, positions, 8100, q_mean, q_abs, omega, "half", offsets)
    keys_rot = apply_rope(keys_pre, positions, omega, "half").float()
    post = score_postrope(keys_rot, fold_query_stats(8100, q_mean, q_abs, omega, "interleaved", offsets))
    assert (post.double() - pre).abs().max() / pre.abs().max() > 100 * REL_TOL


@pytest.mark.parametrize("protected", [0, 17])
@pytest.mark.parametrize("budget", [40, 120])
def test_keep_sets_equal_between_forms(protected, budget):
    L = 3
    layers = [_random_setup(seed=s) for s in range(L)]
    offsets = geometric_offsets()
    pre = torch.stack(
        [naive_score_prerope(k, p, 8100, qm, qa, om, "half", offsets, 1.1) for k, p, qm, qa, om in layers]
    )
    post = torch.stack([
        score_postrope(apply_rope(k, p, om, "half", 1.1).float(),
                       fold_query_stats(8100, qm, qa, om, "half", offsets, 1.1))
        for k, p, qm, qa, om in layers
    ])
    cand = torch.arange(pre.shape[-1]) >= protected
    keep_pre = select_keep(aggregate_scores(pre, 3, cand), protected, budget)
    keep_post = select_keep(aggregate_scores(post.double(), 3, cand), protected, budget)
    assert torch.equal(keep_pre, keep_post)
    assert keep_pre.shape == (2, 3, budget)
    assert torch.equal(keep_pre[..., :protected], torch.arange(protected).expand(2, 3, protected))


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_compaction_path_matches_independent_oracle(scale):
    """The scoring + selection compact() runs equals an independently written implementation."""
    L, B, Hkv, G, N, D = 3, 2, 2, 3, 300, 64
    g = torch.Generator().manual_seed(1)
    F = D // 2
    inv_freq = 10000.0 ** (-torch.arange(F, dtype=torch.float64) * 2 / D)
    positions = torch.arange(N) + 5
    keys = [apply_rope(torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64), positions.expand(B, Hkv, N),
                       inv_freq, "half", scale).float() for _ in range(L)]
    q_mean = torch.complex(torch.randn(L, Hkv * G, F, generator=g, dtype=torch.float64),
                           torch.randn(L, Hkv * G, F, generator=g, dtype=torch.float64))
    q_abs = q_mean.abs() + torch.rand(L, Hkv * G, F, generator=g, dtype=torch.float64)
    round_start, protected, budget = N + 5, 20, 150
    inputs = CompactionInputs(keys, positions.expand(L, B, Hkv, N), round_start, protected, 0, q_mean, q_abs,
                              inv_freq.expand(L, F), "half", scale)
    ours = keep_slots(TriAttention().scores(inputs), protected, 0, budget)[0]
    oracle = independent_keep_sets(keys, positions, round_start, q_mean.real, q_mean.imag, q_abs, inv_freq, scale,
                                   protected, budget)
    assert torch.equal(ours, oracle)
    smaller = independent_keep_sets(keys, positions, round_start, q_mean.real, q_mean.imag, q_abs, inv_freq, scale,
                                    protected, budget - 50)
    assert not torch.equal(ours[..., : budget - 50], smaller)  # the budget changes the keep set
