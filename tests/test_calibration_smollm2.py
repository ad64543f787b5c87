"""Offline calibration on the real SmolLM2-135M equals one forward pass over the whole text (the paper's tool,
TRIATTENTION.md §2 (b)), computed here independently with forward hooks on each layer's ``q_proj``."""

from __future__ import annotations

import pytest
import torch

import triattn_compile as tc
from triattn_compile.evaluation.documents import calibration_text
from triattn_compile.loading import load_model

TOKENS = 2048
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model()
    ids = tokenizer(calibration_text("pydoc-topics"), return_tensors="pt").input_ids[0][:TOKENS]
    assert ids.numel() == TOKENS
    return model, ids


@pytest.fixture(scope="module")
def reference(smollm2):
    """Per (layer, head, band) complex mean and mean magnitude of the pre-RoPE queries of one pass over ``ids``:
    Llama's pre-RoPE query is ``q_proj(x)`` viewed ``[T, H, D]``; rotate-half pairs dims f and f + D/2."""
    model, ids = smollm2
    heads, dim = model.config.num_attention_heads, model.config.head_dim
    seen = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model.model(ids[None], use_cache=False)  # the decoder without its LM head
    finally:
        for hook in hooks:
            hook.remove()
    q = torch.stack(seen).double().view(len(seen), ids.numel(), heads, dim)  # [L, T, H, D]
    bands = torch.complex(q[..., : dim // 2], q[..., dim // 2 :])
    return bands.mean(1), bands.abs().mean(1)  # [L, H, F] each


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per layer ``||a - b|| / ||b||`` over heads and bands ``[L]``."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def _check_equal(stats: tc.QueryStats, reference) -> None:
    q_mean, q_abs = reference
    worst = max(_relative(stats.q_mean(), q_mean).max().item(), _relative(stats.q_abs(), q_abs).max().item())
    print(f"worst layer's relative difference to the single-pass reference: {worst:.2e}")
    assert worst <= 1e-5


def test_default_is_one_pass_over_the_text(smollm2, reference):
    model, ids = smollm2
    stats = tc.calibrate(model, ids)
    report = stats.report
    assert (report.tokens, report.documents, report.contexts, report.forward_passes) == (TOKENS, 1, 1, 1)
    assert report.context_length == model.config.max_position_embeddings and not report.cache_carried
    _check_equal(stats, reference)


def test_memory_chunks_carry_the_cache(smollm2, reference):
    model, ids = smollm2
    stats = tc.calibrate(model, ids, memory_chunk=512)
    assert stats.report.cache_carried and stats.report.forward_passes == 4 and stats.report.tokens_per_pass == 512
    _check_equal(stats, reference)


def test_independent_1024_token_contexts_differ(smollm2, reference):
    """The earlier default: each query sees at most its 1,024-token chunk. Layer 0 sees no context (it agrees);
    every later layer's centre moves."""
    model, ids = smollm2
    stats = tc.calibrate(model, ids, context_length=1024)
    assert stats.report.contexts == 2 and stats.report.split_documents == 1
    q_mean = reference[0]
    per_head = (stats.q_mean() - q_mean).norm(dim=-1) / q_mean.norm(dim=-1)  # [L, H]
    median = per_head[1:].median().item()
    print(f"1,024-token contexts: layer 0 {per_head[0].max().item():.2e}, later layers' median {median:.3f}")
    assert per_head[0].max() <= 1e-5
    assert median >= 0.01
