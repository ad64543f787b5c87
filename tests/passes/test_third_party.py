"""Third-party decoders with their own KV caches go through ``optimize`` with no adapter, called as their own code
calls them: upstream gpt-fast (``KVCache`` buffers written at ``input_pos``, real-pair ``stack`` RoPE,
``repeat_interleave`` GQA) and torchtune's llama3 ``TransformerDecoder`` (``KVCache`` written at its own
``cache_pos`` counter, with its own bounds check; ``unsqueeze/expand/flatten`` GQA), and rasbt's LLMs-from-scratch
Llama 3 (a cache grown by ``torch.cat`` in a caller-held object, a Python-int position counter, masked_fill
attention), all vendored unchanged in ``tests/thirdparty/``; Meta's Llama 3 reference (plain tensor attributes
``[B, S, Hkv, D]`` written at a Python-int ``start_pos`` by slice and read back as a slice, complex RoPE, explicit
attention; fairscale layers swapped for ``nn.Linear``) and LitGPT's ``GPT`` (``index_copy_`` into a slice of its
``KVCache`` buffers, read back up to ``input_pos_maxp1``, its mask indexed by position) with the minimal changes
their headers list. Mistral's one-file reference, whose prompt attends to its new keys rather than to the cache it
writes, is refused in one line."""

from __future__ import annotations

import pytest
import torch
from thirdparty import (
    cat_cache_model,
    gptfast_model,
    litgpt_model,
    llama3_reference,
    mistral_reference,
    torchtune_llama3,
)
from torch._dynamo.utils import counters

import triattn_compile as tc

PROMPT = 6


def _gptfast(capacity: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = gptfast_model.Transformer(gptfast_model.ModelArgs(
        block_size=4096, vocab_size=128, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128)).eval()
    model.setup_caches(max_batch_size=1, max_seq_length=capacity)
    return model


def _torchtune(capacity: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchtune_llama3.llama3(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                                    max_seq_len=4096, intermediate_dim=128).eval()
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=capacity)
    return model


def _gptfast_step(model, tokens, position, capacity):
    return model(tokens, torch.arange(position, position + tokens.shape[1]))


def _torchtune_step(model, tokens, position, capacity):
    t = tokens.shape[1]  # torchtune checks the mask's shape, [B, T, cache length]; the pass replaces its values
    mask = torch.ones(t, capacity, dtype=torch.bool).tril(min(position, capacity - t))[None]
    return model(tokens, input_pos=torch.arange(position, position + t)[None], mask=mask)


DECODERS = {"gpt-fast": (_gptfast, _gptfast_step), "torchtune": (_torchtune, _torchtune_step)}


@torch.no_grad()
def _greedy(model, step, capacity, n, ids):
    out, logits = [ids], step(model, ids, 0, capacity)
    for i in range(n):
        out.append(logits[:, -1:].argmax(-1))
        logits = step(model, out[-1], ids.shape[1] + i, capacity)
    return torch.cat(out, 1)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_exact_while_fitting_then_bounded_through_compactions(name):
    build, step = DECODERS[name]
    budget, divide = 32, 16
    capacity = budget + divide
    reference = _greedy(build(512), step, 512, capacity - PROMPT, _ids())
    model = tc.optimize(build(capacity), budget=budget, divide_length=divide, compiler="eager")
    assert torch.equal(_greedy(model, step, capacity, capacity - PROMPT, _ids()), reference)
    layout = tc.inspect(model).layout
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (2, 4, 2, 16)
    assert {(x.rotary_form, x.pairing, x.rotary_dim) for x in layout.layers} == {("real-pair stack", "interleaved", 16)}
    if hasattr(model, "reset_caches"):
        model.reset_caches()  # torchtune: its own counter starts again (gpt-fast: the positions it is given do)
    _greedy(model, step, capacity, 200, _ids(2))  # a new sequence: the model writes position 0 again
    cache = tc.current_cache(model)
    assert cache.tokens_seen() == PROMPT + 200 and cache.peak_occupancy() == capacity
    assert cache.compactions() == (PROMPT + 200 - capacity) // divide + 1  # every divide_length steps
    attention = "attention" if name == "gpt-fast" else "attn"
    own = dict(model.named_buffers())[f"layers.0.{attention}.kv_cache.k_cache"]
    assert own is cache.layers[0].keys  # the model's own buffer is the compressed storage


@pytest.mark.slow
@torch.no_grad()
def test_gptfast_two_thousand_tokens_under_inductor_at_budget_128():
    """Budget 128 (prompt not protected), 2,000 generated tokens, Inductor: a compaction every 128 steps once 256
    tokens are held, and no compilation after the warm-up; a second model at another budget works alongside."""
    capacity = 256
    model = tc.optimize(_gptfast(capacity), budget=128, protect_prompt=False)
    reference = _greedy(_gptfast(512), _gptfast_step, 512, 200, _ids())
    assert torch.equal(_greedy(model, _gptfast_step, capacity, 200, _ids()), reference)  # fits: exact
    other = tc.optimize(_gptfast(48), budget=32, divide_length=16, protect_prompt=False)
    _greedy(other, _gptfast_step, 48, 60, _ids())
    graphs = counters["stats"]["unique_graphs"]
    _greedy(model, _gptfast_step, capacity, 2000, _ids(3))
    cache = tc.current_cache(model)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"
    assert cache.compactions() == (PROMPT + 2000 - capacity) // 128 + 1 and cache.peak_occupancy() == capacity
    assert tc.current_cache(other).compactions() >= 1


def test_own_cache_of_the_wrong_length_is_one_line():
    model = tc.optimize(_gptfast(64), budget=32, divide_length=16, compiler="eager")
    with pytest.raises(ValueError) as exc:
        _greedy(model, _gptfast_step, 64, 1, _ids())
    assert "set it up for batch 1 and budget + divide_length = 48 positions" in str(exc.value)
    assert "\n" not in str(exc.value)


def _cat_model(context: int = 4096) -> torch.nn.Module:
    torch.manual_seed(0)
    return cat_cache_model.Llama3Model({
        "vocab_size": 128, "emb_dim": 64, "n_heads": 4, "n_kv_groups": 2, "n_layers": 2, "hidden_dim": 128,
        "context_length": context, "rope_base": 10000.0, "rope_freq": None, "dtype": torch.float32}).eval()


@torch.no_grad()
def _cat_greedy(model, n, ids):
    """rasbt's ``generate_text_simple`` loop: a new ``KVCache`` per sequence, the model's counter reset."""
    cache = cat_cache_model.KVCache(n_layers=2)
    model.reset_kv_cache()
    out, logits = [ids], model(ids, cache=cache)
    for _ in range(n):
        out.append(logits[:, -1:].argmax(-1))
        logits = model(out[-1], cache=cache)
    return torch.cat(out, 1), cache


def test_cache_grown_by_cat_exact_while_fitting_then_bounded_through_compactions():
    """A decoder whose cache is ``torch.cat([cache, new], dim=2)``, kept by the caller in a cache object and passed
    back: the new keys go to the compressed cache, and what the caller keeps is a zero-memory stand-in."""
    budget, divide = 32, 16
    capacity = budget + divide
    reference = _cat_greedy(_cat_model(), capacity - PROMPT, _ids())[0]
    model = tc.optimize(_cat_model(), budget=budget, divide_length=divide, compiler="eager")
    tokens, kept = _cat_greedy(model, capacity - PROMPT, _ids())
    assert torch.equal(tokens, reference)
    assert {(x.rotary_form, x.pairing, x.attention) for x in tc.inspect(model).layout.layers} == {
        ("rotate_half", "half", "eager")}
    keys = kept.get(0)[0]
    assert keys.shape == (1, 2, capacity, 16) and keys.stride() == (0, 0, 0, 0)  # shaped as grown, no memory
    graphs = counters["stats"]["unique_graphs"]
    _cat_greedy(model, 200, _ids(2))  # a new KVCache: a new sequence
    cache = tc.current_cache(model)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"
    assert cache.tokens_seen() == PROMPT + 200 and cache.peak_occupancy() == capacity
    assert cache.compactions() == (PROMPT + 200 - capacity) // divide + 1


@pytest.mark.slow
@torch.no_grad()
def test_cache_grown_by_cat_two_thousand_tokens_under_inductor_at_budget_128():
    model = tc.optimize(_cat_model(), budget=128, protect_prompt=False)
    _cat_greedy(model, 20, _ids())  # warm-up: prefill and decode graphs
    graphs = counters["stats"]["unique_graphs"]
    _cat_greedy(model, 2000, _ids(3))
    cache = tc.current_cache(model)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"
    assert cache.compactions() == (PROMPT + 2000 - 256) // 128 + 1 and cache.peak_occupancy() == 256


@pytest.mark.slow
@torch.no_grad()
def test_torchtune_two_thousand_tokens_at_budget_128():
    capacity = 256
    model = tc.optimize(_torchtune(capacity), budget=128, protect_prompt=False, compiler="eager")
    _greedy(model, _torchtune_step, capacity, 20, _ids())  # warm-up: prefill and decode graphs
    graphs = counters["stats"]["unique_graphs"]
    model.reset_caches()
    _greedy(model, _torchtune_step, capacity, 2000, _ids(3))
    cache = tc.current_cache(model)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"
    assert cache.compactions() == (PROMPT + 2000 - capacity) // 128 + 1 and cache.peak_occupancy() == capacity


def test_a_grown_cache_that_is_not_returned_is_one_line():
    model = tc.optimize(_cat_model(64), budget=32, divide_length=16, compiler="eager")
    with pytest.raises(tc.PatternNotFound) as exc:
        with torch.no_grad():
            model(_ids())  # no cache: the keys are neither written into one nor returned
    message = str(exc.value)
    assert "\n" not in message and "attention site 0" in message and "nor returned as a grown cache" in message


def _meta(capacity: int) -> torch.nn.Module:
    """Meta's reference: its KV cache is ``[max_batch_size, max_seq_len, ...]``, so ``max_seq_len`` is the capacity;
    its RoPE table covers ``2 * max_seq_len`` positions, so a longer one is given for longer generations."""
    torch.manual_seed(0)
    model = llama3_reference.Transformer(llama3_reference.ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, rope_theta=10000.0,
        max_batch_size=1, max_seq_len=capacity)).eval()
    model.freqs_cis = llama3_reference.precompute_freqs_cis(16, 1024, 10000.0)
    return model


def _meta_generate(model, prompt, total):
    """``llama/generation.py`` ``Llama.generate`` for one prompt, greedy: ``tokens`` is ``[1, total]``, the model is
    called as ``model.forward(tokens[:, prev_pos:cur_pos], prev_pos)`` (its own cap of ``total`` at
    ``max_seq_len`` left out: the compressed cache is what lets it generate further)."""
    tokens = torch.zeros((1, total), dtype=torch.long)
    tokens[0, :prompt.shape[1]] = prompt[0]
    prev_pos = 0
    for cur_pos in range(prompt.shape[1], total):
        logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
        tokens[:, cur_pos] = torch.argmax(logits[:, -1], dim=-1).reshape(-1)
        prev_pos = cur_pos
    return tokens


def _litgpt(capacity: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = litgpt_model.GPT(litgpt_model.Config(
        block_size=4096, vocab_size=128, padded_vocab_size=128, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
        intermediate_size=128, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        parallel_residual=False)).eval()
    model.max_seq_length = 1024  # RoPE table and the longest sequence; the KV cache is set up separately
    model.set_kv_cache(batch_size=1, max_seq_length=capacity)
    return model


@torch.no_grad()
def _litgpt_generate(model, prompt, total):
    """``litgpt/generate/base.py`` ``generate_fn``, greedy: ``model(x, input_pos, input_pos_maxp1=...)``, the
    positions tensor advanced in place."""
    size = prompt.shape[1]
    token, out, input_pos, maxp1 = prompt, [prompt], torch.arange(0, size), size
    for i in range(total - size):
        token = model(token.view(1, -1), input_pos, input_pos_maxp1=maxp1)[0, -1].argmax().view(1)
        out.append(token.view(1, 1))
        if i == 0:
            input_pos = torch.tensor([size])
        else:
            input_pos.add_(1)
        maxp1 += 1
    return torch.cat(out, 1)


SLICED = {"meta-llama3": (_meta, _meta_generate, ("complex", "eager"), lambda m: m.layers[0].attention.cache_k),
          "litgpt": (_litgpt, _litgpt_generate, ("partial", "sdpa"), lambda m: m.transformer.h[0].attn.kv_cache.k)}


@pytest.mark.parametrize("name", sorted(SLICED))
def test_cache_read_back_as_a_slice_exact_then_bounded(name):
    """A cache written by position and read back as ``cache[:, :position + T]`` (Meta: ``[B, S, Hkv, D]`` plain
    attributes, a Python-int ``start_pos``; LitGPT: ``[B, Hkv, S, D]`` buffers, ``input_pos_maxp1``): exact while it
    fits, then compacted every divide_length steps; once a sequence has passed the capacity (the model's slicing
    of its own buffer compiles a graph for positions past it), a new one compiles nothing."""
    build, generate, (rotary, attention), own = SLICED[name]
    budget, divide = 32, 16
    capacity = budget + divide
    reference = generate(build(512), _ids(), capacity)
    model = tc.optimize(build(capacity), budget=budget, divide_length=divide, compiler="eager")
    assert torch.equal(generate(model, _ids(), capacity), reference)
    layout = tc.inspect(model).layout
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (2, 4, 2, 16)
    assert rotary in layout.layers[0].rotary_form and layout.layers[0].attention == attention
    total = 126
    generate(model, _ids(2), total)  # positions 0 again: a new sequence, past the capacity
    graphs = counters["stats"]["unique_graphs"]
    generate(model, _ids(3), total)
    cache = tc.current_cache(model)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the warm-up"
    assert cache.tokens_seen() == total - 1 and cache.peak_occupancy() == capacity
    assert cache.compactions() == (total - 1 - capacity) // divide + 1
    # the model's own buffer is the compressed storage (Meta's [B, S, Hkv, D] one seen transposed)
    assert own(model).untyped_storage().data_ptr() == cache.layers[0].keys.untyped_storage().data_ptr()


def test_meta_reference_cache_of_the_wrong_length_is_one_line():
    model = tc.optimize(_meta(64), budget=32, divide_length=16, compiler="eager")
    with pytest.raises(ValueError) as exc:
        _meta_generate(model, _ids(), PROMPT + 1)
    message = str(exc.value)
    assert "\n" not in message and "[1, 64, 2, 16]" in message and "= 48 positions on its axis 1" in message


def test_mistral_reference_whose_prompt_attends_to_its_new_keys_is_one_line():
    """Mistral's one-file reference writes the prompt's keys into its cache but attends to the keys themselves (and a
    decode step reads its position on the host, ``.item()``): refused at the first call, naming the site."""
    torch.manual_seed(0)
    model = mistral_reference.Transformer(mistral_reference.TransformerArgs(
        dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=128,
        rope_theta=10000.0, max_seq_len=48, max_batch_size=1)).half().eval()
    model = tc.optimize(model, budget=32, divide_length=16, compiler="eager")
    with pytest.raises(tc.PatternNotFound) as exc:
        with torch.no_grad():
            model.forward(_ids(), torch.arange(0, PROMPT))
    message = str(exc.value)
    assert "\n" not in message and message.startswith("attention site 0 (")
    assert "not the cache they are written into (scatter_)" in message
