"""Batched generation: every sequence of an equal-length batch gets its own positions, keep sets and tokens, equal to
the same sequence generated alone (greedy), before and after compactions."""

from __future__ import annotations

import torch
from conftest import tiny_llama

import triattn_compile as tc


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
