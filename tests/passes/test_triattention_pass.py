"""The pass on a tiny Llama: it fires, it is exact while the sequence fits, it bounds the cache, and it compacts
to the keep set the reference equations choose."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch._dynamo.utils import counters

import triattn_compile as tc
from triattn_compile.cache import CompressedCache


def _generate(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_exact_while_sequence_fits(llama, compiler):
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref_logits = llama(ids).logits
    ref = _generate(llama, ids, 60)
    tc.optimize(llama, budget=256, compiler=compiler)
    with torch.no_grad():
        logits = llama(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(_generate(llama, ids, 60), ref)
    assert counters["triattn"]["compress"] >= 1 and counters["triattn"]["capture"] >= 2  # the rewrite fired
    assert counters["triattn"]["grouped"] == 2 * counters["triattn"]["compress"]  # SDPA reads the cache unrepeated
    assert tc.cache_occupancy(llama) == [12 + 59] * 2


def test_cache_is_bounded_and_positions_stay_absolute(llama):
    ids = torch.randint(0, 128, (1, 10))
    tc.optimize(llama, budget=160, compiler="eager")
    out = _generate(llama, ids, 700)
    cache: CompressedCache = tc.current_cache(llama)
    assert out.shape[1] == 710
    assert cache.peak_occupancy() == 160 + 128
    assert cache.compactions() == (10 + 699 - 288) // 128 + 1
    assert cache.tokens_seen() == 709
    pos = cache.slot_pos[:, :, :, : cache.occupancy()[0]]
    # prompt kept in every head; positions strictly increasing (temporal order); last token is the newest
    assert torch.equal(pos[..., :10], torch.arange(10).expand_as(pos[..., :10]))
    assert bool((pos.diff(dim=-1) > 0).all())
    assert bool((pos[..., -1] == 708).all())
    # shared keep set across layers (paper default), different sets across KV heads
    assert torch.equal(pos[0], pos[1])
    assert not torch.equal(pos[:, :, 0], pos[:, :, 1])


def test_after_eviction_logits_equal_plain_attention_over_kept_tokens():
    """After compactions, a decode step of the compressed model equals the unmodified model attending to exactly the
    kept keys/values (as a DynamicCache) at the same absolute position: the mask hides empty slots and RoPE
    positions stay absolute."""
    from transformers import DynamicCache

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 8))
    tc.optimize(model, budget=160, compiler="eager")
    out = _generate(model, ids, 450)
    cache = tc.current_cache(model)
    assert cache.compactions() >= 2 and cache.occupancy()[0] < cache.capacity - 1
    n, position = cache.occupancy()[0], cache.tokens_seen()
    kept = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        kept.update(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone(), i)
    token = out[:, -1:]
    with torch.no_grad():
        logits = model(token, past_key_values=cache).logits[0, -1]
        tc.restore(model)
        ref = model(token, past_key_values=kept, position_ids=torch.tensor([[position]])).logits[0, -1]
        wrong_pos = model(token, past_key_values=kept, position_ids=torch.tensor([[n]])).logits[0, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert (wrong_pos - ref).abs().max() > 1e-3  # slot-based positions would be visibly wrong


def test_budgets_change_occupancy_and_keep_sets():
    ids = torch.randint(0, 128, (1, 10))
    kept = {}
    for budget in (160, 300):
        model = tiny_llama()
        tc.optimize(model, budget=budget, compiler="eager")
        _generate(model, ids, 600)
        cache = tc.current_cache(model)
        assert cache.peak_occupancy() == budget + 128
        kept[budget] = set(cache.slot_pos[0, 0, 0, : cache.occupancy()[0]].tolist())
        torch._dynamo.reset()
    assert kept[160] != kept[300] and len(kept[160]) < len(kept[300])


def test_per_layer_keep_sets(llama):
    tc.optimize(llama, budget=160, per_layer=True, compiler="eager")
    _generate(llama, torch.randint(0, 128, (1, 10)), 400)
    pos = tc.current_cache(llama).slot_pos
    assert not torch.equal(pos[0], pos[1])


def test_decode_does_not_recompile(llama):
    tc.optimize(llama, budget=160, compiler="inductor")
    ids = torch.randint(0, 128, (1, 10))
    _generate(llama, ids, 3)  # warm-up: prefill graph + decode graph
    frames = counters["stats"]["unique_graphs"]
    _generate(llama, ids, 560)  # three compactions
    assert counters["stats"]["unique_graphs"] == frames
    assert tc.current_cache(llama).compactions() >= 2


def test_online_stats_equal_independent_capture(llama):
    """Online calibration sums exactly the pre-RoPE queries a forward hook on q_proj sees."""
    captured = {i: [] for i in range(2)}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out.detach()))
        for i, layer in enumerate(llama.model.layers)
    ]
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        llama(ids)
    for h in hooks:
        h.remove()
    tc.optimize(llama, budget=160, compiler="eager")
    with torch.no_grad():
        llama(ids)
    stats = tc.query_stats(llama)
    for i in range(2):
        q = captured[i][-1].view(20, 4, 16)  # [T, H, D]
        z = torch.complex(q[..., :8].double(), q[..., 8:].double())
        torch.testing.assert_close(stats.q_mean()[i], z.mean(0))
        torch.testing.assert_close(stats.q_abs()[i], z.abs().mean(0))
    assert stats.tokens() == 20


def test_sampling_and_eos(llama):
    ids = torch.randint(0, 128, (1, 10))
    tc.optimize(llama, budget=160, compiler="eager")
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=400, do_sample=True,
                                 temperature=0.8, top_p=0.95)
    assert sampled.shape[1] == 410 and tc.current_cache(llama).peak_occupancy() == 288
    greedy = _generate(llama, ids, 40)
    eos = int(greedy[0, 10 + 20])  # a token the greedy continuation emits: generation must stop there
    with torch.no_grad():
        stopped = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 eos_token_id=eos)
    first = int((greedy[0, 10:] == eos).nonzero()[0])
    assert stopped.shape[1] == 10 + first + 1 and int(stopped[0, -1]) == eos
