"""Batched generation with ragged prompts (left padding): each row keeps its own positions, write pointer, protected
prompt and compaction schedule, so its greedy tokens equal the same prompt generated alone, also when rows finish
at different times (eos); a mask that is not left padding is refused with a one-line error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc

LENGTHS = (5, 13, 9)
NEW = 120  # budget 32 + period 16: each row compacts at its own steps, >= 5 times


def _greedy(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in LENGTHS]
    # fixed statistics: online ones would keep accumulating across the calls being compared
    stats = tc.calibrate(model, torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(4)))
    tc.optimize(model, budget=32, divide_length=16, compiler="eager",
                stats=stats.save(tmp_path_factory.mktemp("stats") / "stats.safetensors"))
    alone = []
    for p in prompts:
        out = _greedy(model, p[None], torch.ones(1, len(p), dtype=torch.long))
        alone.append(out[0, len(p):])
        assert tc.current_cache(model).compactions() >= 2
    return model, *_left_pad(prompts), alone


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def test_left_padded_batch_equals_prompts_alone(setup):
    model, ids, mask, alone = setup
    batched = _greedy(model, ids, mask)[:, ids.shape[1]:]
    cache = tc.current_cache(model)
    assert cache.row_rounds == [(n + NEW - 1 - 48) // 16 + 1 for n in LENGTHS]  # each row on its own schedule
    for i, tokens in enumerate(alone):
        diverged = (batched[i] != tokens).nonzero()
        assert diverged.numel() == 0, f"row {i} (prompt {LENGTHS[i]}) diverges at token {int(diverged[0])}"
    # each row's slots hold its own positions, never padding
    assert (cache.slot_pos[..., : cache.budget] >= 0).all()


def test_rows_finishing_at_different_times(setup):
    model, ids, mask, alone = setup
    # eos: a token no row generates before step 20 that ends the rows at different steps (the most rows ending)
    first = [{int(t): s for s, t in reversed(list(enumerate(a)))} for a in alone]
    ends = {t: sorted(f.get(t, NEW) for f in first) for t in set().union(*first)}
    usable = [t for t, e in ends.items() if e[0] >= 20 and e[-1] - e[0] >= 10]
    eos = min(usable, key=lambda t: (ends[t].count(NEW), ends[t], t))
    batched = _greedy(model, ids, mask, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    for i, tokens in enumerate(alone):
        stop = first[i].get(eos, NEW - 1) + 1
        assert torch.equal(batched[i, :stop], tokens[:stop]), f"row {i} differs before its eos"
        assert (batched[i, stop:] == 0).all()  # finished rows were fed padding tokens from then on


@pytest.mark.parametrize("holes", [[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]], ids=["right", "hole", "empty"])
def test_mask_that_is_not_left_padding_is_refused(holes):
    model = tiny_llama()
    tc.optimize(model, budget=32, divide_length=16, compiler="eager")
    ids = torch.randint(1, 128, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], holes])
    with pytest.raises(ValueError) as exc:
        model(input_ids=ids, attention_mask=mask)
    message = str(exc.value)
    assert "\n" not in message and "left padding" in message


def test_online_statistics_leave_out_padding():
    """Online calibration over a left-padded prompt batch sees exactly the rows' own queries: the same statistics
    as the prompts fed one by one."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in LENGTHS]
    ids, mask = _left_pad(prompts)

    def online_stats(feed):
        model = tiny_llama()
        tc.optimize(model, budget=32, divide_length=16, compiler="eager")
        with torch.no_grad():
            feed(model)
        return tc.query_stats(model)

    batched = online_stats(lambda model: model(input_ids=ids, attention_mask=mask))
    alone = online_stats(lambda model: [model(input_ids=p[None]) for p in prompts])
    assert batched.count.tolist() == alone.count.tolist() == [sum(LENGTHS)] * len(alone.count)
    for a, b in zip(batched.tensors(), alone.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
