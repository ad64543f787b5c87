"""Other transformers decoder families, random tiny weights: optimize works with no code change (exact while the
sequence fits, bounded after), or fails with a one-line error naming the site and pattern."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import triattn_compile as tc

FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3 (QK-norm)": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
    "olmo2 (QK-norm)": (T.Olmo2Config, T.Olmo2ForCausalLM, {}),
}


def _model(config_cls, model_cls, extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, **extra,
    )
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    model = _model(*FAMILIES[family])
    ids = torch.randint(0, 128, (1, 10))
    ref = _greedy(model, ids, 40)
    tc.optimize(model, budget=160, compiler="eager")
    assert torch.equal(_greedy(model, ids, 40), ref)
    _greedy(model, ids, 400)
    assert tc.current_cache(model).peak_occupancy() == 288


def test_partial_rotary_is_a_clear_error():
    model = _model(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {"rotary_pct": 0.5})
    with pytest.raises(tc.PatternNotFound) as exc:
        tc.optimize(model, budget=160)
    assert "partial rotary" in str(exc.value) and "\n" not in str(exc.value)
