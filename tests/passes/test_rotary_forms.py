"""Rotary forms are recognised by their arithmetic (and near-misses are not); the pass-through (non-rotary) term of
partial rotary is scored identically in the pre- and post-RoPE forms; the capture op records interleaved bands and
pass-through means exactly as an independent hook sees them."""

from __future__ import annotations

import gptfast
import pytest
import torch
import transformers as T

import triattn_compile as tc
from triattn_compile.kernels.scoring.naive import (
    PAIRINGS,
    apply_rope,
    fold_query_stats,
    geometric_offsets,
    naive_score_prerope,
    score_pass_through,
    score_postrope,
)
from triattn_compile.passes.frequencies import rotary_frequencies
from triattn_compile.passes.match import find_attention_sites
from triattn_compile.passes.rotary import match_rotary


def _graph_of(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0].graph


def _matches(fn):
    x, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    graph = _graph_of(fn, x, cos, sin)
    output = next(n for n in graph.nodes if n.op == "output").args[0][0]
    while output.op == "call_method" and output.target in ("type_as", "float", "to"):
        output = output.args[0]  # the pass walks back through trailing casts too
    return match_rotary(output)


def _every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rope_every_two(x, cos, sin):
    return x * cos + _every_two(x) * sin


def _deinterleave(x, c, s):  # DeepSeek rope_interleave: pairs (2f, 2f + 1) in, halves out
    x1, x2, c, s = x[..., 0::2], x[..., 1::2], c[..., : x.shape[-1] // 2], s[..., : x.shape[-1] // 2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def _halves(x, c, s):  # gpt-oss: first, second = chunk(x, 2, -1)
    first, second = torch.chunk(x, 2, dim=-1)
    c, s = c[..., : x.shape[-1] // 2], s[..., : x.shape[-1] // 2]
    return torch.cat((first * c - second * s, second * c + first * s), dim=-1)


def _trailing_split(x, c, s):  # MLA: q_nope, q_pe = split(q, [4, 4]); cat(q_nope, rope(q_pe))
    nope, pe = torch.split(x, [4, 4], dim=-1)
    return torch.cat((nope, _deinterleave(pe, c, s)), dim=-1)


def _gptfast_rope(x, freqs_cis):  # upstream gpt-fast / torchtune: x [B, S, H, D], freqs_cis [S, D/2, 2] (cos, sin)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    table = freqs_cis.view(-1, pairs.size(1), 1, pairs.size(3), 2)
    out = torch.stack((pairs[..., 0] * table[..., 0] - pairs[..., 1] * table[..., 1],
                       pairs[..., 1] * table[..., 0] + pairs[..., 0] * table[..., 1]), -1)
    return out.flatten(3).type_as(x)


def _pair_table(c, s, bands):  # [S, F, 2] (cos, sin) from the [1, 1, S, D] test inputs (S = 3 here, x's S = 2)
    return torch.stack((c[0, 0, :2, :bands], s[0, 0, :2, :bands]), -1)


def _real_pairs(fn, bands=4):  # fn(p0, p1, cos, sin) -> (real, imag): the members of the pairs written out
    def rope(x, c, s):
        pairs, table = x.reshape(*x.shape[:-1], -1, 2), torch.stack((c[..., :bands], s[..., :bands]), -1)
        return torch.stack(fn(pairs[..., 0], pairs[..., 1], table[..., 0], table[..., 1]), -1).flatten(-2)
    return rope


def _unbound_pairs(x, c, s):  # operands commuted, members taken with unbind
    x0, x1 = x.reshape(*x.shape[:-1], 4, 2).unbind(-1)
    cos, sin = torch.stack((c[..., :4], s[..., :4]), -1).unbind(-1)
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).flatten(-2)


def _vllm_rope(x, c, s, rotary_dim=8, neox=True):  # vLLM RotaryEmbedding.forward_static with custom ops off
    bands = rotary_dim // 2
    rot, rest, c, s = x[..., :rotary_dim], x[..., rotary_dim:], c[..., :bands], s[..., :bands]
    x1, x2 = torch.chunk(rot, 2, dim=-1) if neox else (rot[..., ::2], rot[..., 1::2])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.cat((o1, o2), dim=-1) if neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)  # vLLM always concatenates the pass-through part, empty or not


# form: (fn, pairing of the pre-RoPE input, rotary dims, first rotary dim, pairing of the rotated output)
FORMS = {
    "rotate-half": (lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s, "half", 8, 0, "half"),
    "rotate-every-two": (lambda x, c, s: x * c + _every_two(x) * s, "interleaved", 8, 0, "interleaved"),
    "partial": (lambda x, c, s: torch.cat((_rope_every_two(x[..., :4], c[..., :4], s[..., :4]), x[..., 4:]), -1),
                "interleaved", 4, 0, "interleaved"),
    "trailing partial": (lambda x, c, s: torch.cat((x[..., :4], _rope_every_two(x[..., 4:], c[..., 4:], s[..., 4:])),
                                                   -1), "interleaved", 4, 4, "interleaved"),
    "complex": (lambda x, c, s: torch.view_as_real(
        torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * torch.polar(c[..., :4], s[..., :4])
    ).flatten(3), "interleaved", 8, 0, "interleaved"),
    "de-interleave": (_deinterleave, "interleaved", 8, 0, "half"),
    "halves (chunk)": (_halves, "half", 8, 0, "half"),
    "trailing split de-interleave (MLA)": (_trailing_split, "interleaved", 4, 4, "half"),
    "real-pair stack (gpt-fast, torchtune)": (lambda x, c, s: _gptfast_rope(x, _pair_table(c, s, 4)), "interleaved",
                                              8, 0, "interleaved"),
    "real-pair stack (unbind, commuted)": (_unbound_pairs, "interleaved", 8, 0, "interleaved"),
    "partial real-pair stack": (lambda x, c, s: torch.cat((_gptfast_rope(x[..., :4], _pair_table(c, s, 2)),
                                                           x[..., 4:]), -1), "interleaved", 4, 0, "interleaved"),
    "vLLM neox": (_vllm_rope, "half", 8, 0, "half"),
    "vLLM GPT-J": (lambda x, c, s: _vllm_rope(x, c, s, neox=False), "interleaved", 8, 0, "interleaved"),
    "vLLM partial neox": (lambda x, c, s: _vllm_rope(x, c, s, rotary_dim=4), "half", 4, 0, "half"),
    "trailing partial real-pair stack": (lambda x, c, s: torch.cat(
        (x[..., :4], _gptfast_rope(x[..., 4:], _pair_table(c, s, 2))), -1), "interleaved", 4, 4, "interleaved"),
}
NEAR_MISSES = {
    "swapped signs": lambda x, c, s: x * c + torch.stack((x[..., 1::2], -x[..., ::2]), dim=-1).flatten(-2) * s,
    "wrong half": lambda x, c, s: x * c + torch.cat((-x[..., 2:], x[..., :2]), -1) * s,
    "other tensor rotated": lambda x, c, s: x * c + _every_two(x + 1) * s,
    "pass-through in the middle": lambda x, c, s: torch.cat(
        (x[..., :2], _rope_every_two(x[..., 2:6], c[..., 2:6], s[..., 2:6]), x[..., 6:]), -1),
    "de-interleave, wrong cross term": lambda x, c, s: torch.cat(
        (x[..., 0::2] * c[..., :4] - x[..., 1::2] * s[..., :4], x[..., 0::2] * c[..., :4] + x[..., 1::2] * s[..., :4]),
        -1),
    "vLLM GPT-J, wrong cross term": lambda x, c, s: torch.stack(
        (x[..., ::2] * c[..., :4] - x[..., 1::2] * s[..., :4], x[..., 1::2] * c[..., :4] + x[..., 1::2] * s[..., :4]),
        -1).flatten(-2),
    "real pairs, swapped signs": _real_pairs(lambda a, b, c, s: (a * c + b * s, b * c - a * s)),
    "real pairs, swapped members": _real_pairs(lambda a, b, c, s: (b * c - a * s, a * c + b * s)),
    "real pairs, cos/sin indices swapped": _real_pairs(lambda a, b, c, s: (a * s - b * c, b * s + a * c)),
    "real pairs, wrong cross term": _real_pairs(lambda a, b, c, s: (a * c - b * s, b * c + a * c)),
    "real pairs, other tensor's members": lambda x, c, s: _real_pairs(lambda a, b, c_, s_: (
        a * c_ - b * s_, (b + 1) * c_ + a * s_))(x, c, s),
}


@pytest.mark.parametrize("form", FORMS)
def test_form_is_recognised(form):
    fn, pairing, rotary_dim, start, key_pairing = FORMS[form]
    m = _matches(fn)
    assert m is not None and (m.pairing, m.rotary_dim, m.rotary_start, m.key_pairing) == (
        pairing, rotary_dim, start, key_pairing)
    assert m.pre.op == "placeholder" or m.pre.args[0].op == "placeholder"  # the pre-RoPE tensor is x (or x.float())


@pytest.mark.parametrize("form", NEAR_MISSES)
def test_near_miss_is_not_a_rotary(form):
    assert _matches(NEAR_MISSES[form]) is None


def _partial_setup(D=24, r=16, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    F, Hkv = r // 2, 2
    omega = 10000.0 ** (-torch.arange(F, dtype=torch.float64) * 2 / r)
    keys_pre = torch.randn(1, Hkv, 150, D, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 5000, (1, Hkv, 150), generator=g)
    q_mean = torch.complex(torch.randn(Hkv * G, F, generator=g, dtype=torch.float64),
                           torch.randn(Hkv * G, F, generator=g, dtype=torch.float64))
    q_abs = q_mean.abs() + torch.rand(Hkv * G, F, generator=g, dtype=torch.float64)
    q_pass = 3 * torch.randn(Hkv * G, D - r, generator=g, dtype=torch.float64)
    return keys_pre, positions, q_mean, q_abs, q_pass, omega


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_pass_through_term_equal_in_both_forms(pairing, scale):
    keys_pre, positions, q_mean, q_abs, q_pass, omega = _partial_setup()
    offsets = geometric_offsets()
    pre = naive_score_prerope(keys_pre, positions, 5100, q_mean, q_abs, omega, pairing, offsets, scale, q_pass=q_pass)
    keys_rot = apply_rope(keys_pre, positions, omega, pairing, scale).float()
    assert torch.equal(keys_rot[..., 16:], keys_pre[..., 16:].float())  # pass-through dims are not rotated
    folded = fold_query_stats(5100, q_mean, q_abs, omega, pairing, offsets, scale)
    post = score_postrope(keys_rot, folded, q_pass=q_pass)
    assert (post.double() - pre).abs().max() / pre.abs().max() < 1e-5
    without = score_postrope(keys_rot, folded)
    assert (post - without).abs().max() / post.abs().max() > 0.1  # the term matters


def test_pass_through_term_is_the_expected_logit():
    """Σ_d q̄_d k_d is exactly the mean over queries of their pass-through logits (linearity: no approximation)."""
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(500, 4, 8, generator=g, dtype=torch.float64)  # [n, H, P]
    keys = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64)  # [B, Hkv, N, P]
    expected = torch.einsum("qhp,bhnp->qbhn", queries, keys.repeat_interleave(2, dim=1)).mean(0)
    torch.testing.assert_close(score_pass_through(keys, queries.mean(0)).double(), expected, rtol=1e-5, atol=1e-5)


def _tiny(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, **extra)
    config._attn_implementation = "sdpa"
    return model_cls(config).eval()


@pytest.mark.parametrize("family", ["phi (partial, half)", "cohere (interleaved)", "smollm3 (NoPE layer 1)"])
def test_capture_equals_independent_hook(family, tmp_path):
    nope = ()
    if family.startswith("phi"):
        model, rotary, pairing = _tiny(T.PhiConfig, T.PhiForCausalLM, partial_rotary_factor=0.5), 8, "half"
    elif family.startswith("cohere"):
        model, rotary, pairing = _tiny(T.CohereConfig, T.CohereForCausalLM), 16, "interleaved"
    else:
        model, rotary, pairing = _tiny(T.SmolLM3Config, T.SmolLM3ForCausalLM, no_rope_layers=[1, 0]), 16, "half"
        nope = (1,)
    seen = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
             for i, layer in enumerate(model.model.layers)]
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    tc.optimize(model, budget=160, compiler="eager")
    with torch.no_grad():
        model(ids)
    stats = tc.query_stats(model)
    assert (stats.signature.pairing, stats.signature.rotary_dim) == (pairing, rotary)
    assert stats.signature.nope_layers == ",".join(map(str, nope))
    for i in range(2):
        q = seen[i].view(20, 4, 16).double()
        z = torch.complex(q[..., :rotary // 2], q[..., rotary // 2: rotary]) if pairing == "half" else \
            torch.complex(q[..., 0:rotary:2], q[..., 1:rotary:2])
        passing = q if i in nope else q[..., rotary:]  # right-aligned in q_pass_mean
        if i in nope:
            z = z * 0  # a layer without RoPE has no bands: all its dims pass through
        torch.testing.assert_close(stats.q_mean()[i], z.mean(0))
        torch.testing.assert_close(stats.q_abs()[i], z.abs().mean(0))
        q_pass = stats.q_pass_mean()[i]
        torch.testing.assert_close(q_pass[:, q_pass.shape[-1] - passing.shape[-1]:], passing.mean(0))
        assert not q_pass[:, : q_pass.shape[-1] - passing.shape[-1]].any()
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = type(stats).load(path, stats.signature)
    torch.testing.assert_close(loaded.q_pass_mean(), stats.q_pass_mean().float().double())


class _PairTableAttention(torch.nn.Module):
    """One torchtune-style attention layer: a ``[max_seq, F, 2]`` (cos, sin) cache gathered at ``input_pos``, RoPE on
    the leading ``rotary`` dims of each head (all of them by default), SDPA. ``mscale`` scales the table (YaRN)."""

    def __init__(self, rotary=16, head_dim=16, heads=2, base=500000.0, mscale=1.0):
        super().__init__()
        self.rotary, self.head_dim, self.heads = rotary, head_dim, heads
        self.theta = 1.0 / base ** (torch.arange(0, rotary, 2)[: rotary // 2].float() / rotary)
        angles = torch.outer(torch.arange(64).float(), self.theta)
        self.register_buffer("cache", mscale * torch.stack((angles.cos(), angles.sin()), -1))
        self.wq, self.wk, self.wv = (torch.nn.Linear(32, heads * head_dim, bias=False) for _ in range(3))

    def _rope(self, x, input_pos):
        r = self.rotary
        rotated = _gptfast_rope(x[..., :r], self.cache[input_pos])
        return rotated if r == self.head_dim else torch.cat((rotated, x[..., r:]), -1)

    def forward(self, h, input_pos):
        b, s, _ = h.shape
        q, k, v = (w(h).view(b, s, self.heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = self._rope(q, input_pos), self._rope(k, input_pos)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("rotary,mscale", [(16, 1.0), (8, 1.25)])
def test_real_pair_stack_frequencies_are_exact(rotary, mscale):
    """ω and the attention scaling of a real-pair stack site are read off its cos/sin (one column per band) on the
    probe at positions {0, 1}: ω is exactly the angle of the table's row 1, the scaling its magnitude."""
    torch.manual_seed(0)
    model = _PairTableAttention(rotary=rotary, mscale=mscale).eval()
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 2, 32), torch.arange(2))
    gm, example_inputs = seen[0]
    site = find_attention_sites(gm.graph, need_cache=False)[0]
    assert (site.query.form, site.query.table) == ("real-pair stack" if rotary == 16 else "partial", "bands")
    assert (site.query.pairing, site.query.key_pairing, site.query.rotary_dim) == ("interleaved", "interleaved", rotary)
    omega, scale = rotary_frequencies(gm, site, example_inputs)
    row = model.cache[1].double()  # [F, 2]: (cos, sin) of ω at position 1
    torch.testing.assert_close(omega, torch.atan2(row[:, 1], row[:, 0]), rtol=1e-15, atol=0)  # to the float64 ulp
    torch.testing.assert_close(omega, model.theta.double(), rtol=1e-6, atol=0)
    assert abs(scale - mscale) < 1e-6


def _upstream_gptfast_model():
    """gpt-fast (tests/passes/gptfast.py) with upstream's real-pair RoPE: ``freqs_cis`` a ``[max_seq, D/2, 2]``
    (cos, sin) table, applied by :func:`_gptfast_rope` (monkeypatched in by the caller)."""
    torch.manual_seed(0)
    model = gptfast.Transformer(gptfast.ModelArgs()).eval()
    model.freqs_cis = torch.stack((model.freqs_cis.real, model.freqs_cis.imag), -1)
    model.setup_caches(1, 256)
    return model


@torch.no_grad()
def test_upstream_gptfast_real_pair_stack_decoder(monkeypatch):
    """The whole pass on upstream gpt-fast RoPE: ω recovered exactly, interleaved keys, greedy tokens unchanged."""
    monkeypatch.setattr(gptfast, "apply_rotary_emb", _gptfast_rope)
    model = _upstream_gptfast_model()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))

    def greedy(step, steps=6):
        out, logits = [ids], step(ids, 0)
        for i in range(steps):
            out.append(logits[:, -1:].argmax(-1))
            logits = step(out[-1], ids.shape[1] + i)
        return torch.cat(out, 1)

    ref = greedy(lambda x, p: model(x, torch.arange(p, p + x.shape[1])))
    wrapped = tc.optimize(gptfast.CompressedCacheAdapter(model), budget=48, divide_length=16, compiler="eager")
    got = greedy(lambda x, p: wrapped(input_ids=x, past_key_values=None if p == 0 else tc.current_cache(wrapped)))
    layout = tc.inspect(wrapped).layout
    assert layout.describe().startswith("real-pair stack rotary")
    sig = layout.signature
    assert (sig.pairing, sig.rotary_dim, layout.rotary.key_pairing) == ("interleaved", 16, "interleaved")
    row = model.freqs_cis[1].double()
    torch.testing.assert_close(layout.omega, torch.atan2(row[:, 1], row[:, 0]).expand(2, -1), rtol=1e-15, atol=0)
    torch.testing.assert_close(layout.omega[0], 10000.0 ** -(torch.arange(0, 16, 2).double() / 16), rtol=1e-6, atol=0)
    assert abs(sig.attention_scaling - 1.0) < 1e-6
    assert torch.equal(got, ref)  # the sequence fits the cache: nothing evicted yet
    greedy(lambda x, p: wrapped(input_ids=x, past_key_values=None if p == 0 else tc.current_cache(wrapped)), 60)
    cache = tc.current_cache(wrapped)  # past the budget: interleaved keys scored and compacted
    assert cache.peak_occupancy() == 64 and cache.compactions() >= 1 and cache.tokens_seen() == 70
