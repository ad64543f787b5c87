"""Property-based equivalence of the TriAttention pass (hypothesis), over every rotary and layer form it recognises.

For a generated decoder (family, layers, heads, GQA ratio, head_dim, partial rotary fraction, RoPE theta and scaling,
per-layer kinds: RoPE or NoPE, global or sliding window; dtype, prompt length, budget, compaction period, options)
the optimized model is fed a random token sequence (prompt, then one token per call) next to a *simulator*: the
unmodified model in eager mode with an ordinary ``DynamicCache``, whose pre-RoPE q/k are captured by forward hooks
and whose cache is evicted, at the same schedule, to the keep sets that the independently written oracle
(``tests/independent_reference.py``) chooses; sliding-window layers keep their most recent ``budget`` tokens. Checked
at every step:

(a) logits equal the simulator's: before the first compaction that is the unmodified eager model itself; after it,
    the unmodified model attending to exactly the oracle's kept tokens;
(b) the scores the library ranks with equal the paper's pre-RoPE equations (``independent_reference.prerope_scores``,
    plus the pass-through term of non-rotary dims) on the hooked q and k, before the first compaction and after
    each one, for every layer the policy scores. "The library's scores" are its own compaction inputs
    (``schedule.compaction_inputs``: online query statistics, the keys it cached, the pairing, rotary dims,
    frequencies and attention scaling it detected, MLA's folded query) through the scoring functions its policy
    calls; the reference uses the family's pairing and rotary dims (declared below from the modeling code, read off
    the model's modules) and the model's ``inv_freq``;
(c) after each compaction the slots' absolute positions (``CompressedCache.slot_pos``) equal the oracle's keep sets
    (every layer; shared or per-layer sets; prompt protected or not; window layers: their most recent tokens).

Forms generated (``FAMILIES``; the pairing of each is the architecture's, from the modeling function named; every row
of ``passes/rotary.py``'s ``ROTARY_FORMS`` and the NoPE form):

* rotate-half: llama, qwen2, qwen3 (QK-norm), mistral;
* rotate-every-two (interleaved pairs): helium, cohere (QK-norm);
* partial rotary, leading dims: phi and gpt_neox (rotate-half; gpt_neox with a fused QKV projection and MHA),
  glm (rotate-every-two); the fraction is drawn, 1.0 included;
* rotate-half written as halves (``torch.chunk``): gpt_oss (eager attention with sinks, MoE);
* real-pair stack (``stack((p0*c - p1*s, p1*c + p0*s), -1)`` on a ``[..., F, 2]`` (cos, sin) table): no transformers
  family computes RoPE this way (upstream gpt-fast and torchtune do, with their own static KV caches, which this
  simulator cannot evict); ``llama_real_pairs`` is a Llama whose ``apply_rotary_pos_emb`` is upstream gpt-fast's
  ``apply_rotary_emb`` (``real_pair_rope``), patched in for the case, in the simulator's model too. Those decoders
  themselves run in ``tests/passes/test_third_party.py`` (exact while the sequence fits, bounded after);
* NoPE layers: smollm3 (any mix of RoPE and NoPE layers, windows on either), cohere2 (interleaved window layers,
  NoPE global layers);
* sliding windows: mistral (every layer), qwen2 (the layers from ``max_window_layers`` on), gpt_oss and cohere2
  (``layer_types``), smollm3;
* MLA with trailing partial rotary (the only trailing form in transformers): deepseek_v3 (de-interleave:
  interleaved pairs in, halves out), deepseek_v2 (complex ``view_as_complex``), minicpm3 (rotate-half). The latent
  cache is evicted like any other; the oracle scores each query head's own key ``[k_nope,h ; k_pe]``, ``k_nope,h``
  up-projected from the cached latent by the model's own ``kv_b_proj``. MLA with a single query head is not drawn:
  the pass refuses it with a misleading ``keys/values are not written in place into a cache`` (its latent-key test,
  ``passes/match.py`` ``_latent_key``, wants the shared rotary part to have fewer heads than the key: 1 < H).

Other families and attention forms (GPT-J's sin/cos table, gemma2's soft-capping, granitemoe_swa's logsumexp sinks)
run under Inductor through compactions in ``tests/passes/test_families_inductor.py``; per-layer RoPE frequencies
(gemma3) are checked in the layout test of ``tests/passes/test_families.py``.

CI (``ci`` profile) runs one explicit example per form (``FORM_EXAMPLES``, one layer where the form allows and a
one-token prompt mostly, to keep each case to two Dynamo traces) plus the profile's generated cases; the ``long``
profile generates across every family, form and layer mix.

Generated cases are float32; ``test_bfloat16_model_before_compaction`` checks a bfloat16 model up to the first
compaction.

The suite can fail: ``test_wrong_rotary_pairing_is_caught`` swaps the matched pairing (rotate-half read as
interleaved and back) and checks that the same property, run by hypothesis, finds a counterexample through (b) on
an interleaved family (glm, partial rotary) and through (c) on its own on a rotate-half one (llama). (b) recomputes
the library's scores the way its policy composes them, so a mistake in that composition (e.g. the pass-through term
dropped from ``policies.TriAttention.scores``) is caught by (c): seen on the partial, NoPE and MLA examples.

Example counts come from the hypothesis profile (tests/conftest.py): ``ci`` by default, ``HYPOTHESIS_PROFILE=long``
for long runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
import transformers as T
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from independent_reference import OracleLayer, _equally_top, oracle_keep_set, pass_dims, prerope_scores, rotary_bands

import triattn_compile as tc
from triattn_compile.policies import layer_scores
from triattn_compile.schedule import compaction_inputs

VOCAB = 96
# Per-layer kinds: RoPE global (scored), RoPE sliding window, NoPE global (scored), NoPE sliding window.
ROPE, WINDOW, NOPE, NOPE_WINDOW = "G", "W", "N", "V"
WINDOWED, NOPED = (WINDOW, NOPE_WINDOW), (NOPE, NOPE_WINDOW)


def _kinds(allowed: str, need: str = "") -> Callable[[int], st.SearchStrategy[str]]:
    """Layer kinds a family can express: any string over ``allowed`` with at least one of ``need``."""
    def strategy(layers: int) -> st.SearchStrategy[str]:
        s = st.lists(st.sampled_from(allowed), min_size=layers, max_size=layers).map("".join)
        return s.filter(lambda k: any(c in k for c in need)) if need else s

    return strategy


def _all_rope(layers: int) -> st.SearchStrategy[str]:
    return st.just(ROPE * layers)


def _all_or_no_windows(layers: int) -> st.SearchStrategy[str]:
    return st.sampled_from([ROPE * layers, WINDOW * layers])


def _window_suffix(layers: int) -> st.SearchStrategy[str]:
    return st.integers(0, layers).map(lambda m: ROPE * m + WINDOW * (layers - m))


def _layer_types(kinds: str) -> list[str]:
    return ["sliding_attention" if k in WINDOWED else "full_attention" for k in kinds]


# config entries that give a case's layer kinds, as each family's config spells them
def _no_layer_config(case) -> dict:
    return {}


def _mistral_windows(case) -> dict:  # MistralModel masks every layer to config.sliding_window
    return {"sliding_window": case.window or None}


def _qwen2_windows(case) -> dict:  # Qwen2Config: layer i slides iff use_sliding_window and i >= max_window_layers
    return {"use_sliding_window": bool(case.window), "sliding_window": case.window or None,
            "max_window_layers": case.layer_kinds.count(ROPE)}


def _typed_layers(case) -> dict:  # gpt_oss, cohere2: config.layer_types (gpt_oss builds a window mask regardless)
    return {"layer_types": _layer_types(case.layer_kinds), "sliding_window": case.window or 128}


def _smollm3_layers(case) -> dict:  # SmolLM3Attention: use_rope = no_rope_layers[i]; windows from layer_types
    kinds = case.layer_kinds
    return {"no_rope_layers": [int(k not in NOPED) for k in kinds], "layer_types": _layer_types(kinds),
            "use_sliding_window": bool(case.window), "sliding_window": case.window or None}


@dataclass(frozen=True)
class Family:
    """A transformers family, its rotary form and the layer kinds its config can express.

    ``pairing``: how its RoPE pairs the pre-RoPE rotary dims (the modeling function named in ``FAMILIES``);
    ``key_pairing``: how the rotated key pairs them, where that differs. ``rotary``: "head" (every dim),
    "ndims" (``attn.rotary_ndims`` leading dims), "cos" (leading ``cos.shape[-1]`` = 2 len(inv_freq) dims, GLM) or
    "mla" (the trailing ``qk_rope_head_dim`` dims after ``qk_nope_head_dim``). ``fractions``: the partial rotary
    fractions drawn. ``hooks``: where the pre-RoPE q/k are read ("proj": ``q_norm``/``k_norm`` if present, else
    ``q_proj``/``k_proj``; "neox": the fused ``query_key_value``; "mla": ``q_b_proj``/``q_proj`` and
    ``kv_a_proj_with_mqa``). ``nope``: how the modeling code decides a layer has no RoPE.
    """

    config: type
    model: type
    pairing: str
    key_pairing: str | None = None
    kinds: Callable[[int], st.SearchStrategy[str]] = _all_rope
    layer_config: Callable[..., dict] = _no_layer_config
    rotary: str = "head"
    fractions: tuple[float, ...] = (1.0,)
    hooks: str = "proj"
    nope: str = ""  # "use_rope": SmolLM3Attention.use_rope; "global": Cohere2 ropes only its sliding layers
    attn: str = "sdpa"
    extra: dict = field(default_factory=dict)
    apply_rope: Callable | None = None  # replaces the modeling module's apply_rotary_pos_emb during a case


def real_pair_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Upstream gpt-fast's / torchtune's RoPE (``tests/thirdparty/gptfast_model.py`` ``apply_rotary_emb``) on HF's
    ``[B, H, T, D]`` q/k and cos/sin: the pairs ``x.reshape(..., F, 2)`` (interleaved) times a ``[..., F, 2]``
    (cos, sin) table, written out on real pairs and stacked back."""
    F = cos.shape[-1] // 2  # HF's cos/sin are cat(freqs, freqs): band f's angle in column f
    table = torch.stack((cos[..., :F], sin[..., :F]), -1).unsqueeze(unsqueeze_dim)  # [B, 1, T, F, 2]

    def rope(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        out = torch.stack([pairs[..., 0] * table[..., 0] - pairs[..., 1] * table[..., 1],
                           pairs[..., 1] * table[..., 0] + pairs[..., 0] * table[..., 1]], -1)
        return out.flatten(3).type_as(x)

    return rope(q), rope(k)


_HALF, _EVERY_TWO = "half", "interleaved"
_MLA = {"kv_lora_rank": 16, "q_lora_rank": 24, "v_head_dim": 16}
FAMILIES: dict[str, Family] = {
    # rotate_half = cat(-x[..., d/2:], x[..., :d/2]) (modeling_llama.rotate_half and its copies)
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, _HALF),
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM, _HALF, kinds=_window_suffix, layer_config=_qwen2_windows),
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM, _HALF),  # QK-norm before RoPE
    # a Llama whose apply_rotary_pos_emb is upstream gpt-fast's (interleaved pairs in and out)
    "llama_real_pairs": Family(T.LlamaConfig, T.LlamaForCausalLM, _EVERY_TWO, apply_rope=real_pair_rope),
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, _HALF, kinds=_all_or_no_windows,
                      layer_config=_mistral_windows),
    # modeling_helium / modeling_cohere rotate_half: stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
    "helium": Family(T.HeliumConfig, T.HeliumForCausalLM, _EVERY_TWO),
    "cohere": Family(T.CohereConfig, T.CohereForCausalLM, _EVERY_TWO, extra={"use_qk_norm": True}),
    # partial: cat(rope(x[..., :r]), x[..., r:]); phi / gpt_neox rotate_half, glm's rotate_half interleaves
    "phi": Family(T.PhiConfig, T.PhiForCausalLM, _HALF, rotary="ndims", fractions=(0.25, 0.5, 0.75, 1.0)),
    "gpt_neox": Family(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, _HALF, rotary="ndims", fractions=(0.25, 0.5, 1.0),
                       hooks="neox"),
    "glm": Family(T.GlmConfig, T.GlmForCausalLM, _EVERY_TWO, rotary="cos", fractions=(0.25, 0.5, 0.75, 1.0)),
    # modeling_gpt_oss._apply_rotary_emb: first, second = torch.chunk(x, 2, -1) (halves); sinks; MoE
    "gpt_oss": Family(T.GptOssConfig, T.GptOssForCausalLM, _HALF, kinds=_kinds(ROPE + WINDOW),
                      layer_config=_typed_layers, attn="eager", extra={"num_local_experts": 2,
                                                                        "num_experts_per_tok": 1}),
    "smollm3": Family(T.SmolLM3Config, T.SmolLM3ForCausalLM, _HALF, kinds=_kinds(ROPE + WINDOW + NOPE + NOPE_WINDOW,
                                                                                  ROPE + WINDOW),
                      layer_config=_smollm3_layers, nope="use_rope"),
    # modeling_cohere2.rotate_half interleaves; Cohere2Attention applies RoPE only on its sliding layers
    "cohere2": Family(T.Cohere2Config, T.Cohere2ForCausalLM, _EVERY_TWO, kinds=_kinds(WINDOW + NOPE, WINDOW),
                      layer_config=_typed_layers, nope="global"),
    # MLA, rotary on the trailing qk_rope_head_dim dims. deepseek_v3 apply_rotary_pos_emb_interleave:
    # cat(x1*cos - x2*sin, x2*cos + x1*sin) of x1, x2 = x[..., 0::2], x[..., 1::2]: interleaved in, halves out
    "deepseek_v3": Family(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, _EVERY_TWO, _HALF, rotary="mla",
                          fractions=(0.25, 0.5), hooks="mla", extra=_MLA),
    # deepseek_v2 apply_rotary_emb: view_as_complex(x.reshape(..., -1, 2)) * freqs_cis (interleaved in and out)
    "deepseek_v2": Family(T.DeepseekV2Config, T.DeepseekV2ForCausalLM, _EVERY_TWO, rotary="mla",
                          fractions=(0.25, 0.5), hooks="mla", extra=_MLA),
    "minicpm3": Family(T.MiniCPM3Config, T.MiniCPM3ForCausalLM, _HALF, rotary="mla", fractions=(0.25, 0.5),
                       hooks="mla", extra=_MLA),  # rotate_half on q_rot
}
ROPE_SCALINGS = {
    "default": {},
    "linear": {"factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 1024},  # attention scaling 1 + 0.1 ln 4
}
DTYPES = ("float32",)
# (a) logits: max |lib - sim| / max(1, max |sim|); (b) scores: max |lib - ref| / max |ref|. Seen on float32: 2e-6
# and 6e-7 (hidden 16 per head); float32 rounding grows with the logits' magnitude (hidden = heads x head_dim up to
# 512: |logits| up to ~9, |diff| up to 2e-5); on bfloat16 (library bug patched out by hand): 2.3e-2 (1-2 ulp of the
# logits) and 4.6e-3.
LOGIT_ATOL = {"float32": 2e-5, "bfloat16": 5e-2}
SCORE_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Case:
    family: str
    layers: int
    kv_heads: int
    group: int  # query heads per KV head (GQA ratio)
    head_dim: int
    rope_theta: float
    rope: str
    dtype: str
    budget: int
    divide: int
    prompt: int
    new_tokens: int
    protect_prompt: bool
    per_layer: bool
    seed: int
    rotary: float = 1.0  # fraction of head_dim that rotates (partial rotary; MLA: qk_rope_head_dim / head_dim)
    kinds: str = ""  # per layer, ROPE / WINDOW / NOPE / NOPE_WINDOW; "" = every layer ROPE
    window: int = 0  # sliding window of the window layers

    @property
    def layer_kinds(self) -> str:
        kinds = self.kinds or ROPE * self.layers
        assert len(kinds) == self.layers and bool(self.window) == any(k in WINDOWED for k in kinds), self
        return kinds


@st.composite
def cases(draw, dtypes=DTYPES, families=None) -> Case:
    name = draw(st.sampled_from(sorted(families or FAMILIES)))
    family = FAMILIES[name]
    divide = draw(st.sampled_from([8, 16]))
    protect = draw(st.booleans())
    budget = draw(st.integers(divide, 40))
    prompt = draw(st.integers(1, budget if protect else budget + divide))  # a protected prompt is kept whole
    capacity = budget + divide
    # up to two compactions, and some steps after the last one
    new_tokens = draw(st.integers(max(1, capacity - prompt), capacity + divide + 5 - prompt))
    layers = draw(st.integers(1, 3))
    kinds = draw(family.kinds(layers))
    kv_heads = draw(st.integers(1, 2))
    # MLA with a single query head is refused by the pass (module docstring): not drawn
    group = draw(st.integers(2 if family.rotary == "mla" and kv_heads == 1 else 1, 4))
    return Case(
        family=name,
        layers=layers,
        kv_heads=kv_heads,
        group=group,
        head_dim=draw(st.sampled_from([16, 32, 64])),
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0, 1000000.0])),
        rope=draw(st.sampled_from(sorted(ROPE_SCALINGS))),
        dtype=draw(st.sampled_from(dtypes)),
        budget=budget,
        divide=divide,
        prompt=prompt,
        new_tokens=new_tokens,
        protect_prompt=protect,
        per_layer=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        rotary=draw(st.sampled_from(family.fractions)),
        kinds=kinds,
        window=draw(st.integers(2, budget)) if any(k in WINDOWED for k in kinds) else 0,
    )


def build_model(case: Case) -> torch.nn.Module:
    """A transformers decoder of ``case.family`` from its own config class, random weights (seeded)."""
    family = FAMILIES[case.family]
    heads = case.kv_heads * case.group
    rope = {"rope_type": case.rope, "rope_theta": case.rope_theta, **ROPE_SCALINGS[case.rope]}
    shape = {"num_key_value_heads": case.kv_heads, "head_dim": case.head_dim}
    if family.rotary == "mla":  # head = [nope ; rope]; the cache holds the latent and k_pe (one KV head)
        rope_dim = int(case.head_dim * case.rotary)
        shape = {"num_key_value_heads": heads, "qk_rope_head_dim": rope_dim,
                 "qk_nope_head_dim": case.head_dim - rope_dim, "first_k_dense_replace": case.layers}  # dense MLPs
    elif family.rotary != "head":
        rope["partial_rotary_factor"] = case.rotary
    torch.manual_seed(case.seed)
    config = family.config(
        vocab_size=VOCAB, hidden_size=case.head_dim * heads, intermediate_size=64, num_hidden_layers=case.layers,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_attention_heads=heads, max_position_embeddings=4096, rope_parameters=rope, initializer_range=0.1,
        **shape, **family.extra, **family.layer_config(case),
    )
    config._attn_implementation = family.attn
    model = family.model(config).eval().to(getattr(torch, case.dtype))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@dataclass(frozen=True)
class LayerTruth:
    """What a layer's modeling code computes: rotated dims ``[start, start + width)`` (width 0: NoPE), the pairing of
    the pre-RoPE q/k and of the rotated (cached) key, its sliding window (0: global)."""

    start: int
    width: int
    pairing: str
    key_pairing: str
    window: int

    @property
    def kind(self) -> str:
        return {(True, False): ROPE, (True, True): WINDOW, (False, False): NOPE, (False, True): NOPE_WINDOW}[
            (self.width > 0, self.window > 0)]


def layer_truth(family: Family, model: torch.nn.Module, attn: torch.nn.Module, head_dim: int) -> LayerTruth:
    """Read off the layer's modules and config the way its modeling code reads them (nothing from the library)."""
    config = model.config
    window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None)) or 0  # Mistral: the config's
    start, width = 0, head_dim
    if family.rotary == "ndims":
        width = attn.rotary_ndims
    elif family.rotary == "cos":
        width = 2 * model.base_model.rotary_emb.inv_freq.numel()
    elif family.rotary == "mla":
        start, width = attn.qk_nope_head_dim, attn.qk_rope_head_dim
    if (family.nope == "use_rope" and not attn.use_rope) or (family.nope == "global" and attn.sliding_window is None):
        width = 0
    return LayerTruth(start, width, family.pairing, family.key_pairing or family.pairing, window)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = model.base_model.layers
    return [getattr(layer, "self_attn", None) or layer.attention for layer in layers]


class Simulator:
    """The unmodified model, eager, on a ``DynamicCache`` evicted to the oracle's keep sets at the pass's schedule.

    Pre-RoPE q and k ``[T, heads, head_dim]`` are captured with forward hooks (``Family.hooks``); an MLA key is
    ``[k_nope,h ; k_pe]`` per query head. ``pos[l, h]`` are the absolute positions held by layer ``l``'s KV head
    ``h`` (MLA: one KV head, the latent's).
    """

    def __init__(self, model: torch.nn.Module, case: Case):
        self.model, self.case = model, case
        self.family = family = FAMILIES[case.family]
        self.cache = T.DynamicCache()
        self.heads = case.kv_heads * case.group
        self.attn = attention_modules(model)
        self.truth = [layer_truth(family, model, a, case.head_dim) for a in self.attn]
        kinds = "".join(t.kind for t in self.truth)
        assert kinds == case.layer_kinds and {t.window for t in self.truth} <= {0, case.window}, (
            f"the config built has layer kinds {kinds} (window {self.truth}), the case asked for {case.layer_kinds}")
        rotary = model.base_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().double()
        assert all(t.width in (0, 2 * len(self.inv_freq)) for t in self.truth), "rotary dims vs inv_freq"
        self.scaling = float(rotary.attention_scaling)
        # KV heads the keep sets are chosen for, and key heads (MLA: a key per query head)
        self.kv_heads = {"proj": case.kv_heads, "neox": self.heads, "mla": 1}[family.hooks]
        self.key_heads = case.kv_heads if family.hooks == "proj" else self.heads
        self.q_pre: list[list[torch.Tensor]] = [[] for _ in range(case.layers)]  # per call [T, H, D]
        self.k_pre: list[list[torch.Tensor]] = [[] for _ in range(case.layers)]  # per call [T, Hk, D]
        for i, attn in enumerate(self.attn):
            self._hook(attn, self.q_pre[i], self.k_pre[i])
        self.pos = torch.zeros(case.layers, self.kv_heads, 0, dtype=torch.long)
        self.seen = self.protected = self.compactions = 0

    def _hook(self, attn, q_store: list, k_store: list) -> None:
        H, D, kind = self.heads, self.case.head_dim, self.family.hooks

        if kind == "proj":
            q_src = getattr(attn, "q_norm", None) or attn.q_proj
            k_src = getattr(attn, "k_norm", None) or attn.k_proj
            q_src.register_forward_hook(lambda m, a, out: q_store.append(out.detach().reshape(-1, H, D)))
            k_src.register_forward_hook(lambda m, a, out: k_store.append(out.detach().reshape(-1, self.key_heads, D)))
        elif kind == "neox":  # qkv.view(..., H, 3 D): per head [q ; k ; v]
            def qkv(module, args, out):
                x = out.detach().reshape(-1, H, 3 * D)
                q_store.append(x[..., :D])
                k_store.append(x[..., D : 2 * D])

            attn.query_key_value.register_forward_hook(qkv)
        else:  # MLA: q = q_b_proj(...) (or q_proj); kv_a_proj_with_mqa -> [latent ; k_pe]
            q_src = attn.q_b_proj if attn.q_b_proj is not None else attn.q_proj
            q_src.register_forward_hook(lambda m, a, out: q_store.append(out.detach().reshape(-1, H, D)))

            def kv(module, args, out):
                out = out.detach().reshape(-1, out.shape[-1])
                latent = attn.kv_a_layernorm(out[:, : attn.kv_lora_rank])
                k_nope = attn.kv_b_proj(latent).view(-1, H, attn.qk_nope_head_dim + attn.v_head_dim)
                k_pe = out[:, None, attn.kv_lora_rank :].expand(-1, H, -1)
                k_store.append(torch.cat([k_nope[..., : attn.qk_nope_head_dim], k_pe], -1))

            attn.kv_a_proj_with_mqa.register_forward_hook(kv)

    def queries(self, layer: int) -> torch.Tensor:
        return torch.cat(self.q_pre[layer])  # [seen, H, D], row = absolute position

    def keys_pre(self, layer: int) -> torch.Tensor:
        return torch.cat(self.k_pre[layer])  # [seen, Hk, D]

    def query_stats(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q̄ ``[H, F]`` complex128, E|q| ``[H, F]`` and E[q_pass] ``[H, P]`` over every query so far, in the layer's
        pairing and rotary dims."""
        t, q = self.truth[layer], self.queries(layer).double()
        z = rotary_bands(q, t.start, t.width, t.pairing)
        return z.mean(0), z.abs().mean(0), pass_dims(q, t.start, t.width).mean(0)

    def cached_keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s cached (post-RoPE) keys ``[1, Hk, N, D]``; MLA: ``[k_nope,h ; k_pe]`` up-projected from the
        cached latent by the model's ``kv_b_proj``."""
        cached = self.cache.layers[layer]
        if self.family.hooks != "mla":
            return cached.keys
        attn, H = self.attn[layer], self.heads
        latent, k_pe = cached.keys[0, 0], cached.values[0, 0]  # [N, R], [N, rope]
        k_nope = attn.kv_b_proj(latent).view(-1, H, attn.qk_nope_head_dim + attn.v_head_dim)
        keys = torch.cat([k_nope[..., : attn.qk_nope_head_dim], k_pe[:, None].expand(-1, H, -1)], -1)
        return keys.transpose(0, 1)[None]

    def omega(self, layer: int) -> torch.Tensor:
        """The layer's RoPE frequencies ``[F]`` (the model's ``inv_freq``; none for a NoPE layer)."""
        return self.inv_freq[: self.truth[layer].width // 2]

    def scored_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.truth) if not t.window]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, library_pos: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of ``ids``; compacts at the pass's schedule. ``library_pos`` [L, Hkv, n]: the positions the
        library holds after this step, preferred where they differ from the oracle's only among exact ties."""
        n = ids.shape[1]
        positions = torch.arange(self.seen, self.seen + n)
        out = self.model(ids, past_key_values=self.cache, position_ids=positions[None], use_cache=True)
        if self.seen == 0 and self.case.protect_prompt:
            self.protected = n
        self.seen += n
        self.pos = torch.cat([self.pos, positions.expand(*self.pos.shape[:2], n)], dim=-1)
        if self.pos.shape[-1] >= self.case.budget + self.case.divide:
            self._compact(library_pos)
        return out.logits[0].float()

    def _compact(self, library_pos: torch.Tensor | None) -> None:
        c = self.case
        budget, n = c.budget, self.pos.shape[-1]
        H, Hk, Hs = self.heads, self.key_heads, self.kv_heads
        keep = torch.arange(n - budget, n).expand(c.layers, Hs, budget).clone()  # window layers: the most recent
        scored = self.scored_layers()
        stats = {i: self.query_stats(i) for i in scored}
        keys = {i: self.cached_keys(i) for i in scored}
        for group in ([[i] for i in scored] if c.per_layer else [scored] if scored else []):
            for h in range(Hs):
                qs, ks = slice(h * H // Hs, (h + 1) * H // Hs), slice(h * Hk // Hs, (h + 1) * Hk // Hs)
                layers = [OracleLayer(keys[i][:, ks], self.truth[i].start, self.truth[i].width,
                                      self.truth[i].key_pairing, self.omega(i), self.scaling,
                                      *(s[qs] for s in stats[i])) for i in group]
                held = self.pos[group[0], h]
                prefer = None if library_pos is None else _slots_of(held, library_pos[group[0], h])
                kept = oracle_keep_set(layers, held, self.seen, self.protected, budget, prefer)[0]
                keep[group, h] = kept
        for i, layer in enumerate(self.cache.layers):
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, t.gather(2, keep[i][None, :, :, None].expand(1, -1, -1, t.shape[-1])))
        self.pos = self.pos.gather(2, keep)
        self.compactions += 1


def _slots_of(held: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
    """Sorted slot indices ``[1, len(wanted)]`` of the positions ``wanted`` among the slots' positions ``held``, or
    None when one of them is not held."""
    match = held[None, :] == wanted[:, None]  # [K, N]
    if not bool(match.any(-1).all()):
        return None
    return match.int().argmax(-1).sort().values[None]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def library_scores(model, cache) -> list[torch.Tensor]:
    """What the library ranks with, per layer its policy scores: its compaction inputs (statistics, cached keys,
    detected pairing, frequencies and scaling; MLA: ``[k_pe ; latent]`` and the folded query) through the scoring
    functions its policy calls (``policies.TriAttention.scores`` before the z-score). ``[1, H, N]`` each."""
    return list(layer_scores(compaction_inputs(cache, tc.inspect(model))).double())


def reference_scores(sim: Simulator, layer: int, slot_pos: torch.Tensor) -> torch.Tensor:
    """The paper's pre-RoPE form on hooked tensors, the keys at ``slot_pos`` ``[Hs, N]`` (per KV head): ``[1, H, N]``
    (the layer's pairing of the pre-RoPE q/k, its rotary dims, the model's ``inv_freq``)."""
    t = sim.truth[layer]
    q_mean, q_abs, q_pass = sim.query_stats(layer)
    k = sim.keys_pre(layer).double()  # [seen, Hk, D]
    H, Hk, Hs = sim.heads, sim.key_heads, sim.kv_heads
    out = []
    for h in range(Hs):
        qs, ks = slice(h * H // Hs, (h + 1) * H // Hs), slice(h * Hk // Hs, (h + 1) * Hk // Hs)
        keys = k[slot_pos[h], ks].transpose(0, 1)[None]  # [1, Hk / Hs, N, D]
        bands, rest = rotary_bands(keys, t.start, t.width, t.pairing), pass_dims(keys, t.start, t.width)
        out.append(prerope_scores(bands, rest, slot_pos[h], sim.seen, q_mean[qs], q_abs[qs], q_pass[qs],
                                  sim.omega(layer), sim.scaling))
    return torch.cat(out, dim=1)


def run_case(case: Case, compiler: str = "eager", checks: str = "abc") -> None:
    """Feed one token sequence to the optimized model and to the simulator; check (a), (b), (c) at every step.

    ``checks`` selects the properties (keep sets are always compared: the later steps need equal runs).
    Raises AssertionError listing every property that failed (prefixed ``(a)``, ``(b)``, ``(c)``).
    """
    torch._dynamo.reset()
    family = FAMILIES[case.family]
    modeling = sys.modules[family.model.__module__]
    rope = (mock.patch.object(modeling, "apply_rotary_pos_emb", family.apply_rope) if family.apply_rope
            else contextlib.nullcontext())
    with rope:
        _run_case(case, compiler, checks)


def _run_case(case: Case, compiler: str, checks: str) -> None:
    base = build_model(case)
    sim = Simulator(copy.deepcopy(base), case)
    model = tc.optimize(
        base, budget=case.budget, divide_length=case.divide, protect_prompt=case.protect_prompt,
        per_layer=case.per_layer, compiler=compiler,
    )
    if case in _EXPECTED_FORM:  # an explicit example keeps exercising the form it is there for
        forms = {layer.rotary_form for layer in tc.inspect(model).layout.layers}
        assert _EXPECTED_FORM[case] in forms, f"{case}: the pass matched {forms}, not {_EXPECTED_FORM[case]}"
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    ids = torch.randint(0, VOCAB, (1, case.prompt + case.new_tokens), generator=gen)
    chunks = [ids[:, : case.prompt]] + list(ids[:, case.prompt :].split(1, dim=1))
    failures: list[str] = []
    cache = None
    try:
        with torch.no_grad():
            for chunk in chunks:
                seen = sim.seen
                capacity = case.budget + case.divide
                first = cache is not None and sim.compactions == 0 and seen + chunk.shape[1] >= capacity
                if "b" in checks and first:  # just before the first compaction: every token seen is in the cache
                    failures += _check_scores(model, cache, sim, f"before the first compaction (seen {seen})")
                compactions = sim.compactions
                kwargs = {} if cache is None else {"past_key_values": cache}
                logits = model(chunk, **kwargs).logits[0].float()
                cache = tc.current_cache(model)
                held = cache.occupancy()[0]
                ref = sim.step(chunk, cache.slot_pos[:, 0, :, :held])  # exact ties may go the library's way
                err = float((logits - ref).abs().max() / ref.abs().max().clamp_min(1.0))
                if "a" in checks and err > LOGIT_ATOL[case.dtype]:
                    what = "the unmodified model" if compactions == 0 else "the model attending to the kept tokens"
                    failures.append(f"(a) logits at position {seen}: max |diff| / max(1, max |logits|) {err:.3g} "
                                    f"from {what}")
                if cache.compactions() != sim.compactions:
                    failures.append(f"(c) {cache.compactions()} compactions, the reference made {sim.compactions}")
                if sim.compactions > compactions:  # a compaction happened in this step
                    n = cache.occupancy()[0]
                    lib_pos = cache.slot_pos[:, 0, :, :n]  # [L, Hkv, n]
                    if lib_pos.shape != sim.pos.shape or not torch.equal(lib_pos, sim.pos):
                        diff = _keep_diff(lib_pos, sim.pos)
                        failures.append(f"(c) keep sets after compaction {sim.compactions} differ: {diff}")
                        break  # the two runs hold different tokens from here on
                    if "b" in checks:
                        failures += _check_scores(model, cache, sim, f"after compaction {sim.compactions}")
                if failures:
                    break
            if "b" in checks and not failures and sim.compactions == 0:
                failures += _check_scores(model, cache, sim, f"at the end (seen {sim.seen}, no compaction)")
    finally:
        torch._dynamo.reset()
    assert not failures, f"{case}:\n" + "\n".join(failures)


def _check_scores(model, cache, sim: Simulator, when: str) -> list[str]:
    out = []
    tol = SCORE_RTOL[sim.case.dtype]
    n = cache.occupancy()[0]
    scored = sim.scored_layers()
    if not scored:  # every layer slides: nothing is scored
        return out
    lib = library_scores(model, cache)
    if len(lib) != len(scored):
        return [f"(b) the library scores {len(lib)} layers, the model has {len(scored)} global layers {when}"]
    for layer, got in zip(scored, lib):
        positions = cache.slot_pos[layer, 0, :, :n]  # [Hkv, n]
        if bool((positions < 0).any()):
            return [f"(b) layer {layer}: empty slots among the occupied ones {when}"]
        err = _rel_err(got, reference_scores(sim, layer, positions))
        if err > tol:
            out.append(f"(b) layer {layer} scores {when}: relative max error {err:.3g} > {tol}")
    return out


def _keep_diff(lib: torch.Tensor, want: torch.Tensor) -> str:
    if lib.shape != want.shape:
        return f"shapes {tuple(lib.shape)} vs {tuple(want.shape)}"
    layer, head = (lib != want).any(-1).nonzero()[0].tolist()
    a, b = set(lib[layer, head].tolist()), set(want[layer, head].tolist())
    return f"layer {layer} KV head {head}: library only {sorted(a - b)}, reference only {sorted(b - a)}"


# -- the properties --------------------------------------------------------------------------------------------

SMALL = Case("llama", 2, 2, 2, 16, 10000.0, "default", "float32", 16, 8, 5, 30, True, False, 0)
_ONE = dict(prompt=1, new_tokens=33)  # a one-token prompt: prefill and decode share one compiled graph
# One explicit example per form, run in every profile (CI included): (the rotary form the pass must report for one of
# its layers, what else the example brings, the case).
FORM_EXAMPLES: list[tuple[str, str, Case]] = [
    ("rotate_half", "GQA 3:1, a protected 5-token prompt", dataclasses.replace(
        SMALL, family="mistral", layers=1, kv_heads=1, group=3, head_dim=32, rope="linear")),
    ("rotate_half", "a protected 14-token prompt in a 16-token budget: decode tokens compete for 2 slots",
     dataclasses.replace(SMALL, prompt=14)),
    ("rotate_every_two", "", dataclasses.replace(SMALL, family="helium", layers=1, rope_theta=500000.0, **_ONE)),
    ("partial", "rotate-every-two inside, leading dims, YaRN", dataclasses.replace(
        SMALL, family="glm", layers=1, rotary=0.5, rope="yarn", **_ONE)),
    ("partial", "rotate-half inside, fused QKV, MHA, llama3 scaling", dataclasses.replace(
        SMALL, family="gpt_neox", layers=1, rotary=0.25, head_dim=32, rope="llama3", **_ONE, protect_prompt=False)),
    ("real-pair stack", "YaRN", dataclasses.replace(
        SMALL, family="llama_real_pairs", layers=1, kv_heads=1, rope="yarn", **_ONE)),
    ("none (NoPE)", "a NoPE layer before a rotate-half one, one keep set for both", dataclasses.replace(
        SMALL, family="smollm3", kinds="NG", **_ONE, protect_prompt=False)),
    ("rotate-half (halves)", "a window layer, eager attention with sinks, MoE, YaRN", dataclasses.replace(
        SMALL, family="gpt_oss", kinds="WG", window=12, rope="yarn", budget=20, **_ONE)),
    ("trailing partial de-interleave", "MLA", dataclasses.replace(
        SMALL, family="deepseek_v3", layers=1, rotary=0.5, **_ONE, protect_prompt=False)),
    ("trailing partial complex", "MLA, 4 query heads on one latent KV head", dataclasses.replace(
        SMALL, family="deepseek_v2", layers=1, rotary=0.25, head_dim=32, **_ONE)),
]
_EXPECTED_FORM = {case: form for form, _, case in FORM_EXAMPLES}


def _with_examples(test):
    for _, _, case in reversed(FORM_EXAMPLES):
        test = example(case=case)(test)
    return test


@given(case=cases())
@_with_examples
def test_compiled_path_equals_references(case: Case) -> None:
    run_case(case)


def test_equivalence_through_inductor() -> None:
    """One example through Inductor (the default compiler): the same three properties, two compactions. A one-token
    prompt lets the prefill and decode steps share one compiled graph (one Inductor compile, ~20 s cold)."""
    case = dataclasses.replace(SMALL, family="qwen2", rope="llama3", prompt=1, new_tokens=33, protect_prompt=False)
    run_case(case, compiler="inductor")


def test_bfloat16_model_before_compaction() -> None:
    """bfloat16 weights and cache: (a) and (b) up to the first compaction (keep sets are not compared in bf16: its
    rounding makes near-ties between the library's float32 and the oracle's float64 ranking likely)."""
    case = dataclasses.replace(SMALL, dtype="bfloat16", family="qwen3", rope="yarn")
    run_case(dataclasses.replace(case, new_tokens=case.budget + case.divide - case.prompt - 1))


@pytest.fixture
def wrong_pairing(monkeypatch):
    """Every rotary match the pass makes reports the wrong pairing of the pre-RoPE q/k (rotate-half read as
    interleaved and back). Patched where the pass matches a site (``passes/match.py``), not in ``RotaryMatch``:
    a partial match is built from its inner match, and a swap in its constructor would undo itself."""
    from triattn_compile.passes import match

    matched = match.match_rotary
    swap = {"half": "interleaved", "interleaved": "half"}

    def swapped(post):
        found = matched(post)
        return None if found is None else dataclasses.replace(found, pairing=swap[found.pairing])

    monkeypatch.setattr(match, "match_rotary", swapped)


def test_wrong_rotary_pairing_is_caught(wrong_pairing) -> None:
    """The property above, run by hypothesis with the pass's matched pairing swapped, finds a counterexample: on an
    interleaved family (glm's partial rotate-every-two) the scores (b) notice; on a rotate-half one (llama) the keep
    sets (c) notice on their own."""

    @settings(max_examples=1, phases=[Phase.explicit, Phase.generate], database=None)
    @given(case=cases())
    @example(case=dataclasses.replace(SMALL, family="glm", layers=1, rotary=0.5, **_ONE))
    def prop(case: Case) -> None:
        run_case(case)

    with pytest.raises(AssertionError, match=r"\(b\) layer 0 scores before the first compaction"):
        prop()
    with pytest.raises(AssertionError, match=r"\(c\) keep sets after compaction 1 differ"):
        run_case(dataclasses.replace(SMALL, layers=1, **_ONE), checks="a")


def test_exact_ties_may_go_either_way() -> None:
    """Found by the ``long`` profile: two identical tokens in a NoPE layer (positions 19 and 25) have identical keys,
    so their scores tie exactly, and the library's tie-break noise keeps the other one than ``topk`` does. The
    oracle accepts a keep set that differs from its own only among exact ties, and nothing more: one candidate
    swapped for a lower-scored one is refused."""
    run_case(Case("cohere2", 3, 2, 1, 32, 10000.0, "default", "float32", 35, 8, 1, 43, False, True, 2535,
                  kinds="NWN", window=35))
    agg = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert _equally_top(agg, torch.tensor([[0, 2]]), 2) and _equally_top(agg, torch.tensor([[0, 3]]), 2)
    assert not _equally_top(agg, torch.tensor([[0, 1]]), 2)
    assert not _equally_top(agg, torch.tensor([[0, 0]]), 2)
    assert _equally_top(agg, torch.zeros(1, 0, dtype=torch.long), 0)  # a protected prompt that fills the budget
