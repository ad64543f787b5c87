"""Bad input gets one clear line from our code, never a traceback from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("budget", [0, -5, 2.5, "256", True])
def test_bad_budget(llama, budget):
    with pytest.raises(ValueError) as exc:
        tc.optimize(llama, budget=budget)
    assert "budget" in _one_line(exc)


def test_budget_below_compaction_period(llama):
    with pytest.raises(ValueError) as exc:
        tc.optimize(llama, budget=100)
    assert "divide_length" in _one_line(exc)


def test_prompt_too_long_for_prompt_protection(llama):
    tc.optimize(llama, budget=160, compiler="eager")
    ids = torch.randint(0, 128, (1, 170))
    with pytest.raises(ValueError) as exc:
        llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    msg = _one_line(exc)
    assert "budget >= 170" in msg and "protect_prompt=False" in msg


def test_protected_prompt_may_fill_most_of_the_budget(llama):
    """As in the paper's runs (and the vLLM plugin): a protected prompt needs only prompt <= budget; decode tokens
    compete for what is left (here 10 slots per KV head after each compaction)."""
    tc.optimize(llama, budget=160, compiler="eager")
    ids = torch.randint(0, 128, (1, 150))
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, do_sample=False)
    cache = tc.current_cache(llama)
    assert out.shape[1] == 450 and cache.compactions() >= 2 and cache.peak_occupancy() == 288
    assert bool((cache.slot_pos[..., :150] == torch.arange(150)).all())  # the prompt is kept whole


def test_prompt_competes_when_not_protected(llama):
    tc.optimize(llama, budget=160, protect_prompt=False, compiler="eager")
    ids = torch.randint(0, 128, (1, 40))
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, do_sample=False)
    cache = tc.current_cache(llama)
    assert out.shape[1] == 340 and cache.peak_occupancy() == 288
    assert not bool((cache.slot_pos[..., :40] == torch.arange(40)).all())  # some prompt tokens were evicted


def test_cache_passed_under_both_names(llama):
    from transformers import DynamicCache

    tc.optimize(llama, budget=256, compiler="eager")
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(ValueError) as exc:
        llama(input_ids=ids, cache=DynamicCache(), past_key_values=DynamicCache())
    assert "pass it once" in _one_line(exc)
    llama(input_ids=ids, past_key_values=DynamicCache())  # either name alone is accepted
    llama(input_ids=torch.randint(0, 128, (1, 4)), cache=DynamicCache())


def test_unknown_option(llama):
    with pytest.raises(TypeError):
        tc.optimize(llama, budget=256, bogus=1)


def test_optimize_twice(llama):
    tc.optimize(llama, budget=256, compiler="eager")
    with pytest.raises(ValueError) as exc:
        tc.optimize(llama, budget=256)
    assert "already" in _one_line(exc)
    tc.restore(llama)
    tc.optimize(llama, budget=256, compiler="eager")  # allowed again after restore


def test_model_without_rotary_embedding():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64)).eval()
    with pytest.raises(tc.PatternNotFound) as exc:
        tc.optimize(model, budget=256)
    msg = _one_line(exc)
    assert "attention site 0" in msg and "rotary" in msg


def test_padding_mask_other_than_left_padding_is_refused(llama):
    tc.optimize(llama, budget=256, compiler="eager")
    ids = torch.randint(1, 128, (1, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: accepted (tests/test_batching_ragged.py)
    assert llama.generate(ids, attention_mask=mask, max_new_tokens=2).shape == (1, 12)
    mask[0, 5] = 0  # a hole (e.g. a prompt containing the pad token id)
    with pytest.raises(ValueError) as exc:
        llama.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert "attention_mask" in _one_line(exc) and "left padding" in _one_line(exc)


def test_unsupported_dtype(llama):
    llama.to(torch.float64)
    with pytest.raises(ValueError) as exc:
        tc.optimize(llama, budget=256)
    assert "float64" in _one_line(exc) and "model.to(torch.float32)" in _one_line(exc)


def test_model_on_meta_device():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError) as exc:
        tc.optimize(model, budget=256)
    assert "meta device" in _one_line(exc)


def test_stats_of_another_model(tmp_path):
    ids = torch.randint(0, 128, (300,))
    path = tmp_path / "stats.safetensors"
    tc.calibrate(tiny_llama(layers=2), ids).save(path)
    other = tiny_llama(layers=3)
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(other, budget=256, stats=path)
    assert "num_layers" in _one_line(exc)
    other_rope = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(other_rope, budget=256, stats=path)
    assert "rope_fingerprint" in _one_line(exc)


def test_sliding_window_wider_than_budget():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=512)
    with pytest.raises(ValueError) as exc:
        tc.optimize(MistralForCausalLM(config).eval(), budget=256, compiler="eager")
    msg = _one_line(exc)
    assert "sliding window 512" in msg and "budget >= 512" in msg and msg.startswith("attention site 0")
