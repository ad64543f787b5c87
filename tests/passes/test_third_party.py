"""Third-party decoders with their own KV caches go through ``optimize`` with no adapter, called as their own code
calls them: upstream gpt-fast (``KVCache`` buffers written at ``input_pos``, real-pair ``stack`` RoPE,
``repeat_interleave`` GQA) and torchtune's llama3 ``TransformerDecoder`` (``KVCache`` written at its own
``cache_pos`` counter, with its own bounds check; ``unsqueeze/expand/flatten`` GQA), and rasbt's LLMs-from-scratch
Llama 3 (a cache grown by ``torch.cat`` in a caller-held object, a Python-int position counter, masked_fill
attention), all vendored unchanged in ``tests/thirdparty/``."""

from __future__ import annotations

import pytest
import torch
from thirdparty import cat_cache_model, gptfast_model, torchtune_llama3
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


@torch.no_grad()
def test_cache_grown_by_cat_two_thousand_tokens_at_budget_128():
    model = tc.optimize(_cat_model(), budget=128, protect_prompt=False, compiler="eager")
    _cat_greedy(model, 2000, _ids(3))
    cache = tc.current_cache(model)
    assert cache.compactions() == (PROMPT + 2000 - 256) // 128 + 1 and cache.peak_occupancy() == 256


def test_a_grown_cache_that_is_not_returned_is_one_line():
    model = tc.optimize(_cat_model(64), budget=32, divide_length=16, compiler="eager")
    with pytest.raises(tc.PatternNotFound) as exc:
        with torch.no_grad():
            model(_ids())  # no cache: the keys are neither written into one nor returned
    message = str(exc.value)
    assert "\n" not in message and "attention site 0" in message and "nor returned as a grown cache" in message
