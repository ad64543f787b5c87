"""A call with more tokens than the compressed cache has free slots (an unprotected prompt longer than budget +
divide_length, a long new turn) runs in pieces, compacting between them: it returns what feeding the same pieces by
hand returns, the cache never holds more than its capacity, ``generate`` works from such a prompt, and a left-padded
batch of long prompts equals each prompt alone. What cannot be split is refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc

BUDGET, PERIOD = 32, 16
CAPACITY = BUDGET + PERIOD
NEW = 16


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    model = tiny_llama()
    calibration = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(4))
    return tc.calibrate(model, calibration).save(tmp_path_factory.mktemp("stats") / "stats.safetensors")


def _optimized(stats, **options):
    model = tiny_llama()
    return tc.optimize(model, budget=BUDGET, divide_length=PERIOD, compiler="eager", protect_prompt=False,
                       stats=stats, **options)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _by_hand(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``ids`` fed in the pieces a user would cut: each fills the cache up to its capacity."""
    logits, start = [], 0
    while start < ids.shape[1]:
        cache = tc.current_cache(model) if start else None
        stop = min(ids.shape[1], start + CAPACITY - (cache.occupancy()[0] if cache else 0))
        out = model(ids[:, start:stop], **({"past_key_values": cache} if cache else {}))
        logits.append(out.logits)
        start = stop
    return torch.cat(logits, 1)


@torch.no_grad()
def test_long_prompt_equals_its_pieces_fed_by_hand_and_generates(stats):
    ids = _ids(150, 0)
    model, reference = _optimized(stats), _optimized(stats)
    out = model(ids)
    cache = tc.current_cache(model)
    assert out.logits.shape == (1, 150, 128)
    assert cache.peak_occupancy() == CAPACITY and cache.compactions() == 7  # 48, then 16 at a time: 150 = 48 + 6*16 + 6
    by_hand = _by_hand(reference, ids)
    assert torch.equal(out.logits, by_hand)
    # generate() asks for the last one; the LM head over 3 rows instead of 150 may round differently (BLAS)
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:], rtol=0, atol=1e-6)
    tokens = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, 150:]
    assert tc.current_cache(model).peak_occupancy() == CAPACITY
    nxt = by_hand[:, -1:].argmax(-1)
    want = [nxt]
    for _ in range(NEW - 1):  # greedy by hand, one token per call
        nxt = reference(nxt, past_key_values=tc.current_cache(reference)).logits[:, -1:].argmax(-1)
        want.append(nxt)
    assert torch.equal(tokens, torch.cat(want, 1)[0])


@torch.no_grad()
def test_left_padded_long_prompts_equal_each_alone(stats):
    lengths = (120, 150, 131)  # the pieces follow the fullest row; each row still compacts when it is full
    prompts = [_ids(n, 10 + n)[0] for n in lengths]
    model = _optimized(stats)
    alone = [model.generate(p[None], max_new_tokens=NEW, do_sample=False)[0, len(p):] for p in prompts]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)[:, width:]
    assert tc.current_cache(model).peak_occupancy() <= CAPACITY
    for i, tokens in enumerate(alone):
        assert torch.equal(batched[i], tokens), f"row {i} (prompt {lengths[i]}) differs from the prompt alone"


@pytest.mark.parametrize("call, message", [
    (dict(labels=True), "with labels does not fit"),
    (dict(output_attentions=True), "output_attentions=True with 150 tokens"),
    (dict(pad=CAPACITY), "left padding \\(48 tokens\\) fills the whole compressed cache"),
])
def test_what_cannot_be_split_is_refused(stats, call, message):
    model = _optimized(stats)
    ids = _ids(150, 2)
    kwargs = {}
    if call.get("labels"):
        kwargs["labels"] = ids
    if call.get("output_attentions"):
        kwargs["output_attentions"] = True
    if "pad" in call:
        ids = torch.cat([ids, _ids(150, 3)])
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][1, : call["pad"]] = 0
    with pytest.raises(ValueError, match=message) as caught:
        model(ids, **kwargs)
    assert "\n" not in str(caught.value)
