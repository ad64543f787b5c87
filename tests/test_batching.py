"""Batched generation: every sequence of an equal-length batch gets its own positions, keep sets and tokens, equal to
the same sequence generated alone (greedy), before and after compactions."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc
from triattn_compile import schedule
from triattn_compile.policies import POLICIES


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def test_batch_equals_sequences_alone(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(3))
    # fixed statistics: online ones would keep accumulating across the calls being compared
    stats = tc.calibrate(model, torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(4)))
    tc.optimize(model, budget=132, compiler="eager", stats=stats.save(tmp_path / "stats.safetensors"))
    alone = [_greedy(model, ids[i:i + 1], 400) for i in range(3)]
    batched = _greedy(model, ids, 400)
    cache = tc.current_cache(model)
    assert cache.compactions() >= 2
    for i in range(3):
        diverged = (batched[i] != alone[i][0]).nonzero()
        assert diverged.numel() == 0, f"sequence {i} diverges at token {int(diverged[0])}"
    # each sequence chose its own keep set
    assert not torch.equal(cache.slot_pos[:, 0], cache.slot_pos[:, 1])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_rows_compacted_together_equal_rows_compacted_alone(policy, monkeypatch):
    """Full rows on the same schedule are compacted in one call (``cache.full_groups()``): every buffer of the
    cache ends as if each row had been compacted on its own."""
    model = tiny_llama()
    tc.optimize(model, budget=32, divide_length=16, compiler="eager", policy=policy)
    real, groups = schedule.Compressor.compact, []

    def compact_and_check(self, cache, rows):
        alone = copy.deepcopy(cache)
        for row in range(rows.start, rows.stop):
            real(self, alone, row)
        real(self, cache, rows)
        groups.append(rows.stop - rows.start)
        for name in ("slot_pos", "attention", "ctrl"):
            if getattr(cache, name) is not None:
                assert torch.equal(getattr(cache, name), getattr(alone, name)), name
        for layer, single in zip(cache.layers, alone.layers):
            assert torch.equal(layer.keys, single.keys) and torch.equal(layer.values, single.values)
        assert (cache.fill, cache.row_rounds) == (alone.fill, alone.row_rounds)

    monkeypatch.setattr(schedule.Compressor, "compact", compact_and_check)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(7))
    _greedy(model, ids, 60)
    assert groups and all(size == 3 for size in groups)
