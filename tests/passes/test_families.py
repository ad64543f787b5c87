"""transformers decoder families built from their config classes with tiny random weights (2 layers, hidden 64), plus
a plain gpt-fast-style decoder: ``optimize`` works with no family-specific code, or fails with a one-line error
naming the site and the pattern. ``FAMILIES`` is the data behind ``docs/families.md``
(``python tests/passes/families_table.py``).

For every supported row the test asserts, in this order:

1. the layout the pass detected (``tc.inspect(model).layout``) equals the truth computed here from the family's own
   config (:func:`expected_layout`, independent of the library): per layer the pairing of the pre-RoPE query and of
   the rotated keys, the rotary dims and their first dim, NoPE layers, the sliding window, the cached key/value
   widths and latent (MLA) layers; for the model the query/KV heads, head_dim, the RoPE frequencies of every layer
   and the attention scaling. The pairing is the architecture's, declared per ``Family`` with the modeling function
   that implements it; everything else is read off the config the way the modeling code reads it;
2. greedy tokens equal the unmodified model while the sequence fits the cache (``compiler="eager"``);
3. through compactions the cache stays at its capacity, and window layers hold their whole window in every KV head;
   rows marked ``exact_long`` (every layer a window layer) give the unmodified model's tokens throughout.

``tests/passes/test_families_inductor.py`` runs one family per rotary and attention form under Inductor through
compactions against an independent reference. ``test_swapped_layout_fails_the_family_check`` shows that the check of
(1) fails when the pass's pairing or rotary split is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as T
from gptfast import CompressedCacheAdapter, ModelArgs, Transformer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.granitemoe_swa.modeling_granitemoe_swa import GraniteMoeSWAConfig, GraniteMoeSWAForCausalLM

import triattn_compile as tc

BUDGET, DIVIDE = 48, 16  # capacity 64: a few decode steps fill it
PROMPT, EXACT, LONG = 10, 12, 60


def _no_rope_layers(config) -> list[int]:
    """SmolLM3Attention: ``self.use_rope = config.no_rope_layers[layer_idx]`` (0: the layer skips RoPE)."""
    return [i for i, use in enumerate(config.no_rope_layers) if not use]


def _global_layers(config) -> list[int]:
    """Cohere2Attention.forward applies RoPE only ``if self.sliding_window is not None``: its global layers are NoPE."""
    return [i for i, kind in enumerate(config.layer_types) if kind != "sliding_attention"]


@dataclass
class Family:
    config: type
    model: type
    extra: dict = field(default_factory=dict)
    features: str = ""
    attn: str = "sdpa"
    refused: str | None = None  # a substring of the expected one-line error; None = supported
    exact_long: bool = False  # every layer keeps its whole window: exact through compactions too
    # the architecture's truth, for the layout check (expected_layout):
    pairing: str = "half"  # how its RoPE pairs the pre-RoPE query's rotary dims (see the modeling function named)
    key_pairing: str | None = None  # how the rotated (cached) key pairs them, where that differs from ``pairing``
    nope: Callable[[object], list[int]] | None = None  # its NoPE layers, read off the config as the modeling code does
    mha: bool = False  # its attention has no KV-head grouping (the modeling code ignores num_key_value_heads)


OBSERVED: dict[str, str] = {}  # what each family test saw (read by families_table.py)
_MOE = {"num_experts_per_tok": 2}
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
        "v_head_dim": 16}
_MLA_MOE = {"n_routed_experts": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1,
            "topk_group": 1, **_MOE}
_LOCAL_GLOBAL = {"layer_types": ["sliding_attention", "full_attention"]}  # one window layer, one global
# Pairings. "half": ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])`` (modeling_llama.rotate_half and its copies).
# "interleaved": ``rotate_every_two`` = ``stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)`` (GPT-J's name; Cohere,
# Helium, GLM, ERNIE 4.5 name it ``rotate_half`` but interleave), or ``view_as_complex(x.reshape(..., -1, 2))``.
_HALF, _EVERY_TWO = "half", "interleaved"
FAMILIES: dict[str, Family] = {
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, features="rotate-half", pairing=_HALF),  # rotate_half
    "llama (eager attention)": Family(T.LlamaConfig, T.LlamaForCausalLM, attn="eager",
                                      features="matmul-softmax-matmul attention", pairing=_HALF),  # rotate_half
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM, features="rotate-half, qkv bias", pairing=_HALF),
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}, features="QK-norm", pairing=_HALF),
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}, features="rotate-half",
                      pairing=_HALF),
    "olmo2": Family(T.Olmo2Config, T.Olmo2ForCausalLM, features="QK-norm", pairing=_HALF),  # rotate_half
    "cohere": Family(T.CohereConfig, T.CohereForCausalLM, {"use_qk_norm": True},
                     features="interleaved (rotate-every-two), QK-norm",
                     pairing=_EVERY_TWO),  # modeling_cohere.rotate_half: stack([-x[..., 1::2], x[..., ::2]], -1)
    "helium": Family(T.HeliumConfig, T.HeliumForCausalLM, {"head_dim": 16}, features="interleaved",
                     pairing=_EVERY_TWO),  # modeling_helium.rotate_half: stack((-x2, x1), -1), x1 = x[..., 0::2]
    "glm": Family(T.GlmConfig, T.GlmForCausalLM, {"head_dim": 16}, features="interleaved + partial rotary",
                  pairing=_EVERY_TWO),  # modeling_glm.rotate_half (interleaving), on q[..., :rotary_dim]
    "glm4": Family(T.Glm4Config, T.Glm4ForCausalLM, {"head_dim": 16}, features="interleaved + partial rotary",
                   pairing=_EVERY_TWO),  # modeling_glm4.rotate_half (interleaving), on q[..., :rotary_dim]
    "gptj": Family(T.GPTJConfig, T.GPTJForCausalLM, {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
                   attn="eager", features="interleaved + partial, sin/cos table, eager attention",
                   pairing=_EVERY_TWO, mha=True),  # modeling_gptj.rotate_every_two on q[:, :, :, :rotary_dim]
    "gpt_neox": Family(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {"rotary_pct": 0.5}, features="partial rotary",
                       pairing=_HALF, mha=True),  # modeling_gpt_neox.rotate_half on q[..., :rotary_ndims]
    "phi": Family(T.PhiConfig, T.PhiForCausalLM, {"partial_rotary_factor": 0.5}, features="partial rotary",
                  pairing=_HALF),  # modeling_phi.rotate_half on query_states[..., :rotary_ndims]
    "stablelm": Family(T.StableLmConfig, T.StableLmForCausalLM, features="partial rotary (25%)",
                       pairing=_HALF),  # modeling_stablelm.rotate_half on query_states[..., :rotary_ndims]
    "mixtral": Family(T.MixtralConfig, T.MixtralForCausalLM, {"num_local_experts": 4, **_MOE, "sliding_window": None},
                      features="MoE", pairing=_HALF),
    "qwen3_moe": Family(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                        {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **_MOE},
                        features="MoE, QK-norm", pairing=_HALF),
    "olmoe": Family(T.OlmoeConfig, T.OlmoeForCausalLM, {"num_experts": 4, **_MOE}, features="MoE, QK-norm",
                    pairing=_HALF),
    "granite": Family(T.GraniteConfig, T.GraniteForCausalLM, features="rotate-half, scaled residuals", pairing=_HALF),
    "starcoder2": Family(T.Starcoder2Config, T.Starcoder2ForCausalLM, {"sliding_window": None},
                         features="rotate-half, biases", pairing=_HALF),
    "mistral (sliding window)": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 32},
                                       features="sliding window (every layer)", exact_long=True, pairing=_HALF),
    "gemma3": Family(T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 32, **_LOCAL_GLOBAL},
                     features="local/global layers, per-layer frequencies, QK-norm", pairing=_HALF),
    "cohere2": Family(T.Cohere2Config, T.Cohere2ForCausalLM, {"sliding_window": 32, **_LOCAL_GLOBAL},
                      features="interleaved, local/global layers", pairing=_EVERY_TWO,  # modeling_cohere2.rotate_half
                      nope=_global_layers),
    "gemma2": Family(T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 32, **_LOCAL_GLOBAL},
                     attn="eager", features="logit soft-capping (tanh) in eager attention, local/global layers",
                     pairing=_HALF),
    "granitemoe_swa": Family(GraniteMoeSWAConfig, GraniteMoeSWAForCausalLM, {"sliding_window": 32}, attn="eager",
                             features="attention sinks (logsumexp of the masked scores), window layer, MoE",
                             pairing=_HALF),
    "gpt_oss": Family(T.GptOssConfig, T.GptOssForCausalLM,
                      {"head_dim": 16, "num_local_experts": 4, "sliding_window": 32, **_MOE, **_LOCAL_GLOBAL},
                      attn="eager", features="attention sinks (extra softmax column), rotate-half written as halves "
                      "(chunk), local/global layers, MoE",
                      pairing=_HALF),  # modeling_gpt_oss._apply_rotary_emb: torch.chunk(x, 2, -1) halves
    "ernie4_5": Family(T.Ernie4_5Config, T.Ernie4_5ForCausalLM, {"head_dim": 16},
                       features="interleaved rotary computed in float32 (casts around the rotation)",
                       pairing=_EVERY_TWO),  # modeling_ernie4_5.rotate_half: stack((-x2, x1), -1), x1 = x[..., 0::2]
    "smollm3": Family(T.SmolLM3Config, T.SmolLM3ForCausalLM, {"no_rope_layers": [1, 0]},
                      features="NoPE layers (layer 1 without RoPE)", pairing=_HALF, nope=_no_rope_layers),
    # MLA: rotary on the trailing qk_rope_head_dim dims of each head. DeepSeek-V3 / GLM-4-MoE-lite with
    # config.rope_interleave: apply_rotary_pos_emb_interleave rotates pairs (x[..., 0::2], x[..., 1::2]) and writes
    # cat(x1*cos - x2*sin, x2*cos + x1*sin): interleaved pairs in, halves out (the cached k_rot).
    "deepseek_v3": Family(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, {**_MLA, **_MLA_MOE},
                          features="MLA (latent cache), trailing de-interleaved rotary, MoE",
                          pairing=_EVERY_TWO, key_pairing=_HALF),  # apply_rotary_pos_emb_interleave
    "deepseek_v2": Family(T.DeepseekV2Config, T.DeepseekV2ForCausalLM, {**_MLA, **_MLA_MOE},
                          features="MLA (latent cache), trailing complex rotary, MoE",
                          pairing=_EVERY_TWO),  # modeling_deepseek_v2.apply_rotary_emb: view_as_complex(reshape(-1, 2))
    "minicpm3": Family(T.MiniCPM3Config, T.MiniCPM3ForCausalLM, _MLA,
                       features="MLA (latent cache), trailing rotate-half", pairing=_HALF),  # rotate_half on q_rot
    "glm4_moe_lite": Family(T.Glm4MoeLiteConfig, T.Glm4MoeLiteForCausalLM, {**_MLA, **_MLA_MOE},
                            features="MLA (latent cache), trailing de-interleaved rotary, MoE",
                            pairing=_EVERY_TWO, key_pairing=_HALF),  # apply_rotary_pos_emb_interleave
    "mistral4": Family(T.Mistral4Config, T.Mistral4ForCausalLM, _MLA,
                       features="MLA with a position-dependent query scale (Llama-4 attn scale)",
                       refused="no rotary embedding recognised on the query"),
}


def build(family: Family, **overrides):
    """The family's tiny model (seeded random weights); ``overrides`` replace config entries."""
    torch.manual_seed(0)
    config = family.config(**{
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, **family.extra, **overrides,
    })
    config._attn_implementation = family.attn
    model = family.model(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


# -- the truth of a config --------------------------------------------------------------------------------------

LAYER_FIELDS = ("index", "pairing", "key_pairing", "rotary_dim", "rotary_start", "attention", "window", "key_dim",
                "value_dim", "latent")


@dataclass(frozen=True)
class ExpectedLayout:
    """What a model computes at its attention sites, from its config: compared field by field with a ``Layout``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[dict, ...]  # per layer, the LAYER_FIELDS of a LayerLayout
    omega: torch.Tensor  # [L, F] float64 RoPE angular frequencies (zeros for NoPE layers)
    attention_scaling: float

    def shape(self) -> dict:
        return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "layers": list(self.layers)}


def _layer(index, attention, pairing, key_pairing, rotary, start, window, key_dim, value_dim, latent) -> dict:
    if not rotary:  # NoPE: no bands
        pairing = key_pairing = "none"
    return dict(zip(LAYER_FIELDS, (index, pairing, key_pairing, rotary, start, attention, window, key_dim, value_dim,
                                   latent)))


def _frequencies(config, params: dict, rotary: int, layer_type: str | None) -> tuple[torch.Tensor, float]:
    """``ω_f`` of the rotary dims and the cos/sin magnitude, as the config's RoPE type defines them."""
    kind = params.get("rope_type", "default")
    if kind == "default":  # base^(-2f/d); GPT-J has no rope_parameters: create_sinusoidal_positions uses 10000
        base = float(params.get("rope_theta", 10000.0))
        return base ** -(torch.arange(0, rotary, 2, dtype=torch.float64) / rotary), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, None, layer_type=layer_type)
    return inv_freq.double(), float(scaling)


def expected_layout(family: Family, config) -> ExpectedLayout:
    """The layout ``family``'s modeling code computes for ``config`` (what the pass must detect), read the way that
    modeling code reads its config; nothing here comes from the library."""
    c = config.get_text_config()
    heads, layers = c.num_attention_heads, c.num_hidden_layers
    latent = getattr(c, "kv_lora_rank", None) is not None
    if latent:  # MLA: head = [nope ; rope]; the cache holds one latent and one rotated k_rot [B, 1, S, rope] per token
        head_dim, rotary, start = c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_rope_head_dim, c.qk_nope_head_dim
        kv_heads, key_dim, value_dim = 1, c.kv_lora_rank, c.qk_rope_head_dim  # latent as keys, k_rot as values
        if hasattr(c, "rope_interleave"):  # the declared pairing is the one this config selects
            assert (family.pairing, family.key_pairing) == (("interleaved", "half") if c.rope_interleave
                                                            else ("half", None))
    else:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = heads if family.mha else c.num_key_value_heads
        start, key_dim, value_dim = 0, head_dim, head_dim
    types = getattr(c, "layer_types", None)
    window = c.sliding_window if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) else 0
    nope = set(family.nope(c)) if family.nope else set()
    rope_parameters = getattr(c, "rope_parameters", None) or {}
    rows, omegas, scalings = [], [], set()
    for i in range(layers):
        kind = types[i] if types else None
        params = rope_parameters[kind] if kind in rope_parameters else rope_parameters  # per layer type (Gemma 3)
        if not latent:
            # GPT-J: q[..., :config.rotary_dim]; others: int(head_dim * partial_rotary_factor) (rotary_ndims / dim)
            gptj = getattr(c, "rotary_dim", None)
            rotary = gptj if gptj is not None else int(head_dim * params.get("partial_rotary_factor", 1.0))
        roped = i not in nope
        rows.append(_layer(i, family.attn, family.pairing, family.key_pairing or family.pairing,
                           rotary if roped else 0, start if roped else 0,
                           window if kind in (None, "sliding_attention") else 0, key_dim, value_dim, latent))
        omega, scaling = _frequencies(c, params, rotary, kind if kind in rope_parameters else None)
        omegas.append(omega if roped else torch.zeros_like(omega))
        if roped:
            scalings.add(scaling)
    assert len(scalings) == 1, f"RoPE layers with different attention scalings {scalings}"
    return ExpectedLayout(heads, kv_heads, head_dim, tuple(rows), torch.stack(omegas), scalings.pop())


def expected_gptfast(args: ModelArgs) -> ExpectedLayout:
    """gptfast.py: ``apply_rotary_emb`` = ``view_as_complex(x.reshape(..., -1, 2)) * freqs_cis`` (interleaved pairs)
    on every dim of a head, or (``latent_rank``) on its trailing ``head_dim`` dims after ``nope_dim`` pass-through
    ones, with a latent cache of the latent and the rotated ``k_pe``."""
    rope = args.head_dim
    omega = args.rope_base ** -(torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    if args.latent_rank:
        head_dim, kv, start, widths, latent = args.nope_dim + rope, 1, args.nope_dim, (args.latent_rank, rope), True
    else:
        head_dim, kv, start, widths, latent = rope, args.n_local_heads, 0, (rope, rope), False
    rows = tuple(_layer(i, "sdpa", "interleaved", "interleaved", rope, start, 0, *widths, latent)
                 for i in range(args.n_layer))
    return ExpectedLayout(args.n_head, kv, head_dim, rows, omega.expand(args.n_layer, -1), 1.0)


def check_layout(layout: tc.Layout, want: ExpectedLayout) -> None:
    """The detected layout equals the config's truth, layer by layer (AssertionError naming what differs)."""
    got = {"num_heads": layout.num_heads, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
           "layers": [{f: getattr(layer, f) for f in LAYER_FIELDS} for layer in layout.layers]}
    assert got == want.shape(), "detected layout differs from the config's: " + _differences(got, want.shape())
    assert sorted(layout.latent_maps) == [row["index"] for row in want.layers if row["latent"]]
    assert tuple(layout.omega.shape) == tuple(want.omega.shape), "RoPE frequency bands per layer"
    # ω read off the graph: the float32 inv_freq buffer (or GPT-J's float32 sin/cos table) against float64 here
    torch.testing.assert_close(layout.omega, want.omega, rtol=1e-6, atol=1e-7)
    assert layout.attention_scaling == pytest.approx(want.attention_scaling, abs=1e-5)


def _differences(got: dict, want: dict) -> str:
    out = [f"{k} {got[k]} (config: {want[k]})" for k in ("num_heads", "num_kv_heads", "head_dim") if got[k] != want[k]]
    if len(got["layers"]) != len(want["layers"]):
        out.append(f"{len(got['layers'])} attention layers (config: {len(want['layers'])})")
    for a, b in zip(got["layers"], want["layers"]):
        out += [f"layer {b['index']} {k} {a[k]!r} (config: {b[k]!r})" for k in LAYER_FIELDS if a[k] != b[k]]
    return "; ".join(out)


def shown(layout: tc.Layout) -> str:
    """The row's detail in docs/families.md: the pass's description, then each layer as checked (query→key pairing,
    rotary dims, window, latent widths)."""
    def one(layer) -> str:
        if not layer.rotary_dim:
            text = f"{layer.index} NoPE"
        else:
            pairs = layer.pairing if layer.key_pairing == layer.pairing else f"{layer.pairing}→{layer.key_pairing}"
            text = f"{layer.index} {pairs} dims {layer.rotary_start}..{layer.rotary_start + layer.rotary_dim}"
        if layer.window:
            text += f" window {layer.window}"
        if layer.latent:
            text += f" latent k{layer.key_dim}/v{layer.value_dim}"
        return text

    return f"{layout.describe()}; layers: {'; '.join(map(one, layout.layers))}"


# -- the families ---------------------------------------------------------------------------------------------

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
    layout = tc.inspect(model).layout
    check_layout(layout, expected_layout(family, model.config))
    assert torch.equal(_greedy(model, ids, EXACT), ref)
    long = _greedy(model, ids, LONG)
    cache = tc.current_cache(model)
    _check_bounded(cache, PROMPT + LONG - 1)
    seen = cache.tokens_seen()
    for layer in layout.windowed_layers:  # a window layer holds its whole window after compactions, in every KV head
        for head in range(layout.num_kv_heads):
            assert set(range(seen - layout.windows[layer], seen)) <= set(cache.slot_pos[layer, 0, head].tolist())
    OBSERVED[name] = shown(layout)
    if family.exact_long:
        tc.restore(model)
        assert torch.equal(long, _greedy(model, ids, LONG))


@pytest.fixture(params=["pairing", "rotary split"])
def wrong_layout(request, monkeypatch):
    """Every rotary match the pass makes is wrong in one way: its pairing swapped (rotate-half read as interleaved),
    or its rotary split moved (a partial rotary read as two dims wider than the model rotates)."""
    from triattn_compile.passes import rotary

    init = rotary.RotaryMatch.__init__

    def wrong(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if request.param == "pairing":
            self.pairing = {"half": "interleaved", "interleaved": "half"}[self.pairing]
        elif self.form == "partial":  # cat(rope(x[..., :r]), x[..., r:]): report r + 2 rotary dims
            self.rotary_dim += 2

    monkeypatch.setattr(rotary.RotaryMatch, "__init__", wrong)
    return request.param


def test_swapped_layout_fails_the_family_check(wrong_layout):
    """The layout check of ``test_family`` can fail: with the pass's pairing swapped (llama) or its rotary split
    moved (phi: 10 rotary dims reported where it rotates 8), ``check_layout`` raises (``test_family`` runs the same
    check on the intact pass, for these families too)."""
    name = {"pairing": "llama", "rotary split": "phi"}[wrong_layout]
    family = FAMILIES[name]
    model = tc.optimize(build(family), budget=BUDGET, divide_length=DIVIDE, compiler="eager")
    layout = tc.inspect(model).layout
    want = expected_layout(family, model.config)
    field = {"pairing": "pairing", "rotary split": "rotary_dim"}[wrong_layout]
    assert {getattr(layer, field) for layer in layout.layers} != {row[field] for row in want.layers}
    with pytest.raises(AssertionError):
        check_layout(layout, want)


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
    args = ModelArgs()
    model, ids, ref, wrapped = _optimized_gptfast(args)
    layout = tc.inspect(wrapped).layout
    check_layout(layout, expected_gptfast(args))
    omega = model.freqs_cis[1].angle().double()  # row 1 of e^{iωt}: the model's own table
    torch.testing.assert_close(layout.omega, omega.expand(2, -1), rtol=1e-6, atol=1e-7)
    _check_gptfast(wrapped, ids, ref)
    OBSERVED[GPTFAST] = shown(layout)


GPTFAST = "gpt-fast-style plain PyTorch (tests/passes/gptfast.py)"
GPTFAST_FEATURES = "complex freqs_cis, own KV cache via adapter, repeat_interleave GQA"
GPTFAST_MLA = "gpt-fast-style plain PyTorch, latent attention (tests/passes/gptfast.py)"
GPTFAST_MLA_FEATURES = "MLA written plainly: slices, torch.cat key, trailing complex rotary, own latent cache"


@torch.no_grad()
def test_plain_pytorch_latent_attention_decoder():
    """MLA without transformers: the key assembled with ``torch.cat``, the latent up-projection read off the graph."""
    args = ModelArgs(latent_rank=24)
    model, ids, ref, wrapped = _optimized_gptfast(args)
    layout = tc.inspect(wrapped).layout
    check_layout(layout, expected_gptfast(args))
    for i, block in enumerate(model.layers):  # W_UK: wk_b's weight, per head [R, nope]
        w = block.attention.wk_b.weight.double().view(4, 16, 24).transpose(1, 2)
        torch.testing.assert_close(layout.latent_maps[i], w)
    _check_gptfast(wrapped, ids, ref)
    OBSERVED[GPTFAST_MLA] = shown(layout)


def test_families_table_is_current():
    """docs/families.md is generated from FAMILIES (tests/passes/families_table.py); it must list the same rows, each
    supported row with the layout its test checked."""
    table = Path(__file__).parents[2] / "docs" / "families.md"
    text = table.read_text()
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    for name, family in FAMILIES.items():
        status = "refused" if family.refused else "supported"
        assert f"| {name} | {family.features} | {status}" in text, f"docs/families.md is stale for {name}"
        if not family.refused:
            assert "; layers: 0 " in rows[name], f"docs/families.md shows no checked layout for {name}"
    assert f"| {GPTFAST} | {GPTFAST_FEATURES} | supported" in text
    assert f"| {GPTFAST_MLA} | {GPTFAST_MLA_FEATURES} | supported" in text
