"""transformers decoder families built from their config classes with tiny random weights (2 layers, hidden 64), plus
a plain gpt-fast-style decoder: ``optimize`` works with no family-specific code (greedy tokens equal the unmodified
model while the sequence fits, the cache stays bounded after), or fails with a one-line error naming the site and
the pattern. ``FAMILIES`` is the data behind ``docs/families.md`` (``python tests/passes/families_table.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as T
from gptfast import CompressedCacheAdapter, ModelArgs, Transformer
from transformers.models.granitemoe_swa.modeling_granitemoe_swa import GraniteMoeSWAConfig, GraniteMoeSWAForCausalLM

import triattn_compile as tc

BUDGET, DIVIDE = 48, 16  # capacity 64: a few decode steps fill it
PROMPT, EXACT, LONG = 10, 12, 60


@dataclass
class Family:
    config: type
    model: type
    extra: dict = field(default_factory=dict)
    features: str = ""
    attn: str = "sdpa"
    refused: str | None = None  # a substring of the expected one-line error; None = supported
    exact_long: bool = False  # every layer keeps its whole window: exact through compactions too


OBSERVED: dict[str, str] = {}  # what each family test saw (read by families_table.py)
_MOE = {"num_experts_per_tok": 2}
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
        "v_head_dim": 16}
_MLA_MOE = {"n_routed_experts": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
            "topk_group": 1, **_MOE}
_LOCAL_GLOBAL = {"layer_types": ["sliding_attention", "full_attention"]}  # one window layer, one global
FAMILIES: dict[str, Family] = {
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, features="rotate-half"),
    "llama (eager attention)": Family(T.LlamaConfig, T.LlamaForCausalLM, attn="eager",
                                      features="matmul-softmax-matmul attention"),
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM, features="rotate-half, qkv bias"),
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}, features="QK-norm"),
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}, features="rotate-half"),
    "olmo2": Family(T.Olmo2Config, T.Olmo2ForCausalLM, features="QK-norm"),
    "cohere": Family(T.CohereConfig, T.CohereForCausalLM, {"use_qk_norm": True},
                     features="interleaved (rotate-every-two), QK-norm"),
    "helium": Family(T.HeliumConfig, T.HeliumForCausalLM, {"head_dim": 16}, features="interleaved"),
    "glm": Family(T.GlmConfig, T.GlmForCausalLM, {"head_dim": 16}, features="interleaved + partial rotary"),
    "glm4": Family(T.Glm4Config, T.Glm4ForCausalLM, {"head_dim": 16}, features="interleaved + partial rotary"),
    "gptj": Family(T.GPTJConfig, T.GPTJForCausalLM, {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
                   attn="eager", features="interleaved + partial, sin/cos table, eager attention"),
    "gpt_neox": Family(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {"rotary_pct": 0.5}, features="partial rotary"),
    "phi": Family(T.PhiConfig, T.PhiForCausalLM, {"partial_rotary_factor": 0.5}, features="partial rotary"),
    "stablelm": Family(T.StableLmConfig, T.StableLmForCausalLM, features="partial rotary (25%)"),
    "mixtral": Family(T.MixtralConfig, T.MixtralForCausalLM, {"num_local_experts": 4, **_MOE, "sliding_window": None},
                      features="MoE"),
    "qwen3_moe": Family(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                        {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **_MOE},
                        features="MoE, QK-norm"),
    "olmoe": Family(T.OlmoeConfig, T.OlmoeForCausalLM, {"num_experts": 4, **_MOE}, features="MoE, QK-norm"),
    "granite": Family(T.GraniteConfig, T.GraniteForCausalLM, features="rotate-half, scaled residuals"),
    "starcoder2": Family(T.Starcoder2Config, T.Starcoder2ForCausalLM, {"sliding_window": None},
                         features="rotate-half, biases"),
    "mistral (sliding window)": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 32},
                                       features="sliding window (every layer)", exact_long=True),
    "gemma3": Family(T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 32, **_LOCAL_GLOBAL},
                     features="local/global layers, per-layer frequencies, QK-norm"),
    "cohere2": Family(T.Cohere2Config, T.Cohere2ForCausalLM, {"sliding_window": 32, **_LOCAL_GLOBAL},
                      features="interleaved, local/global layers"),
    "gemma2": Family(T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 32, **_LOCAL_GLOBAL},
                     attn="eager", features="logit soft-capping (tanh) in eager attention, local/global layers"),
    "granitemoe_swa": Family(GraniteMoeSWAConfig, GraniteMoeSWAForCausalLM, {"sliding_window": 32}, attn="eager",
                             features="attention sinks (logsumexp of the masked scores), window layer, MoE"),
    "gpt_oss": Family(T.GptOssConfig, T.GptOssForCausalLM,
                      {"head_dim": 16, "num_local_experts": 4, "sliding_window": 32, **_MOE, **_LOCAL_GLOBAL},
                      attn="eager", features="attention sinks (extra softmax column), rotate-half written as halves "
                      "(chunk), local/global layers, MoE"),
    "ernie4_5": Family(T.Ernie4_5Config, T.Ernie4_5ForCausalLM, {"head_dim": 16},
                       features="interleaved rotary computed in float32 (casts around the rotation)"),
    "smollm3": Family(T.SmolLM3Config, T.SmolLM3ForCausalLM, {"no_rope_layers": [1, 0]},
                      features="NoPE layers (layer 1 without RoPE)"),
    "deepseek_v3": Family(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, {**_MLA, **_MLA_MOE},
                          features="MLA (latent cache), trailing de-interleaved rotary, MoE"),
    "deepseek_v2": Family(T.DeepseekV2Config, T.DeepseekV2ForCausalLM, {**_MLA, **_MLA_MOE},
                          features="MLA (latent cache), trailing complex rotary, MoE"),
    "minicpm3": Family(T.MiniCPM3Config, T.MiniCPM3ForCausalLM, _MLA,
                       features="MLA (latent cache), trailing rotate-half"),
    "glm4_moe_lite": Family(T.Glm4MoeLiteConfig, T.Glm4MoeLiteForCausalLM, {**_MLA, **_MLA_MOE},
                            features="MLA (latent cache), trailing de-interleaved rotary, MoE"),
    "mistral4": Family(T.Mistral4Config, T.Mistral4ForCausalLM, _MLA,
                       features="MLA with a position-dependent query scale (Llama-4 attn scale)",
                       refused="no rotary embedding recognised on the query"),
}


def build(family: Family):
    torch.manual_seed(0)
    config = family.config(**{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, **family.extra,
    })
    config._attn_implementation = family.attn
    model = family.model(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def _check_bounded(cache, total):
    assert cache.peak_occupancy() == BUDGET + DIVIDE
    assert cache.compactions() >= 1 and cache.tokens_seen() == total


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    family = FAMILIES[name]
    model = build(family)
    ids = torch.randint(0, 128, (1, PROMPT))
    if family.refused:
        with pytest.raises(tc.PatternNotFound) as exc:
            tc.optimize(model, budget=BUDGET, divide_length=DIVIDE, compiler="eager")
        assert family.refused in str(exc.value) and "\n" not in str(exc.value) and "attention site" in str(exc.value)
        OBSERVED[name] = str(exc.value).split(": ", 1)[1]
        return
    ref = _greedy(model, ids, EXACT)
    tc.optimize(model, budget=BUDGET, divide_length=DIVIDE, compiler="eager")
    assert torch.equal(_greedy(model, ids, EXACT), ref)
    long = _greedy(model, ids, LONG)
    _check_bounded(tc.current_cache(model), PROMPT + LONG - 1)
    layout, cache = tc.inspect(model).layout, tc.current_cache(model)
    for layer in layout.windowed_layers:  # a window layer holds its whole window after compactions
        window = range(cache.tokens_seen() - layout.windows[layer], cache.tokens_seen())
        assert set(window) <= set(cache.slot_pos[layer, 0, 0].tolist())
    OBSERVED[name] = layout.describe()
    if family.exact_long:
        tc.restore(model)
        assert torch.equal(long, _greedy(model, ids, LONG))


def _gptfast_greedy(step, ids, n):
    out, logits = [ids], step(ids, 0)
    for i in range(n):
        out.append(logits[:, -1:].argmax(-1))
        logits = step(out[-1], ids.shape[1] + i)
    return torch.cat(out, 1)


def _optimized_gptfast(args: ModelArgs):
    """A seeded gpt-fast model, its greedy reference tokens, and the optimized adapter around it."""
    torch.manual_seed(0)
    model = Transformer(args).eval()
    model.setup_caches(1, 256)
    ids = torch.randint(0, 128, (1, PROMPT))
    ref = _gptfast_greedy(lambda x, p: model(x, torch.arange(p, p + x.shape[1])), ids, EXACT)
    wrapped = tc.optimize(CompressedCacheAdapter(model), budget=BUDGET, divide_length=DIVIDE, compiler="eager")
    return model, ids, ref, wrapped


def _check_gptfast(wrapped, ids, ref) -> None:
    """Greedy tokens equal the plain model's while the sequence fits; the cache stays bounded after."""

    def step(x, pos):
        cache = None if pos == 0 else tc.current_cache(wrapped)
        return wrapped(input_ids=x, past_key_values=cache)

    assert torch.equal(_gptfast_greedy(step, ids, EXACT), ref)
    _gptfast_greedy(step, ids, LONG)
    _check_bounded(tc.current_cache(wrapped), PROMPT + LONG)


@torch.no_grad()
def test_plain_pytorch_gptfast_decoder():
    """Own modules, own KV cache, complex freqs_cis (view_as_complex), repeat_interleave GQA; through the adapter."""
    model, ids, ref, wrapped = _optimized_gptfast(ModelArgs())
    layout = tc.inspect(wrapped).layout
    assert (layout.rotary.pairing, layout.rotary.rotary_dim) == ("interleaved", 16)
    omega = model.freqs_cis[1].angle().double()  # row 1 of e^{iωt}
    torch.testing.assert_close(layout.omega, omega.expand(2, -1), rtol=1e-6, atol=1e-7)
    _check_gptfast(wrapped, ids, ref)
    OBSERVED[GPTFAST] = layout.describe()


GPTFAST = "gpt-fast-style plain PyTorch (tests/passes/gptfast.py)"
GPTFAST_FEATURES = "complex freqs_cis, own KV cache via adapter, repeat_interleave GQA"
GPTFAST_MLA = "gpt-fast-style plain PyTorch, latent attention (tests/passes/gptfast.py)"
GPTFAST_MLA_FEATURES = "MLA written plainly: slices, torch.cat key, trailing complex rotary, own latent cache"


@torch.no_grad()
def test_plain_pytorch_latent_attention_decoder():
    """MLA without transformers: the key assembled with ``torch.cat``, the latent up-projection read off the graph."""
    model, ids, ref, wrapped = _optimized_gptfast(ModelArgs(latent_rank=24))
    layout = tc.inspect(wrapped).layout
    first = layout.layers[0]
    assert (layout.num_kv_heads, first.rotary_start, (first.key_dim, first.value_dim)) == (1, 16, (24, 16))
    for i, block in enumerate(model.layers):  # W_UK: wk_b's weight, per head [R, nope]
        w = block.attention.wk_b.weight.double().view(4, 16, 24).transpose(1, 2)
        torch.testing.assert_close(layout.latent_maps[i], w)
    _check_gptfast(wrapped, ids, ref)
    OBSERVED[GPTFAST_MLA] = layout.describe()


def test_families_table_is_current():
    """docs/families.md is generated from FAMILIES (tests/passes/families_table.py); it must list the same rows."""
    table = Path(__file__).parents[2] / "docs" / "families.md"
    text = table.read_text()
    for name, family in FAMILIES.items():
        status = "refused" if family.refused else "supported"
        assert f"| {name} | {family.features} | {status}" in text, f"docs/families.md is stale for {name}"
    assert f"| {GPTFAST} | {GPTFAST_FEATURES} | supported" in text
    assert f"| {GPTFAST_MLA} | {GPTFAST_MLA_FEATURES} | supported" in text
