"""``bench/copy_heads.py``'s per-head budget emulation (results/quality-budgets/): each head keeps exactly its budget,
ranked by its own policy over the slots it holds, the rest hidden; and its in-run check fails when a head holds more."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_policies import synthetic

from triattn_compile.policies import TriAttentionLasting, TriAttentionReserve

_spec = importlib.util.spec_from_file_location("copy_heads", Path(__file__).parents[1] / "bench" / "copy_heads.py")
copy_heads = sys.modules["copy_heads"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(copy_heads)


def _inputs():
    """2 layers x 2 KV heads, 32 held slots, run budget (the largest head's) 24; layer 0's head 0 is a copy head."""
    inp = synthetic(N=32, D=4, budget=24)
    inp.round = 0
    inp.distant_attention = inp.attention * torch.rand(inp.attention.shape, generator=torch.Generator().manual_seed(9))
    copy_heads.SCORES = torch.zeros(2, 2, 2)
    copy_heads.SCORES[1, 0, 0] = 1.0  # an induction score
    return inp


def test_valid_inputs_keep_the_held_slots_in_temporal_order():
    inp = _inputs()
    inp.positions[0, 0, 1, ::3] = -1  # layer 0, head 1: every third slot hidden
    held = inp.positions[0, 0, 1][inp.positions[0, 0, 1] >= 0]
    sub, idx = copy_heads.valid_inputs(inp, held.numel())
    assert torch.equal(sub.positions[0, 0, 1], held)
    assert torch.equal(sub.keys[0][0, 1], inp.keys[0][0, 1][inp.positions[0, 0, 1] >= 0])
    assert torch.equal(sub.distant_attention[0, 0, 1], inp.distant_attention[0, 0, 1][idx[0, 0, 1]])
    assert torch.equal(idx[0, 0, 1], (inp.positions[0, 0, 1] >= 0).nonzero().flatten())


def test_each_head_keeps_its_budget_ranked_by_its_own_policy_and_the_rest_is_hidden():
    inp = _inputs()
    policy = copy_heads.HeadBudgets(mean=16, copy=24, threshold=0.5, share=0.5)
    reserve = TriAttentionReserve(share=0.5).scores(replace(inp, budget=24))
    lasting = TriAttentionLasting().scores(replace(inp, budget=13))  # (4 * 16 - 24) // 3 others
    original = inp.positions.clone()
    out = policy.scores(inp)
    held = (inp.positions >= 0).sum(-1)[:, 0]
    assert held.tolist() == [[24, 13], [13, 13]]
    for layer, head, want, k in [(0, 0, reserve, 24), (0, 1, lasting, 13), (1, 0, lasting, 13), (1, 1, lasting, 13)]:
        top = set(want[layer, 0, head].topk(k).indices.tolist())
        kept = set((inp.positions[layer, 0, head] >= 0).nonzero().flatten().tolist())
        assert kept == top, (layer, head)
        assert int((out[layer, 0, head] == -torch.inf).sum()) == 32 - k  # the hidden never win a slot back
    assert torch.equal(inp.positions[inp.positions >= 0], original[inp.positions >= 0])


def test_the_run_fails_when_a_head_holds_more_than_its_budget():
    inp = _inputs()
    inp.round = 1  # as if compacted before, but nothing was hidden
    with pytest.raises(RuntimeError, match="masking did not take"):
        copy_heads.HeadBudgets(mean=16, copy=24, threshold=0.5).scores(inp)


def test_per_layer_budgets_give_every_head_of_a_copy_layer_the_copy_budget():
    inp = _inputs()
    policy = copy_heads.HeadBudgets(mean=16, copy=24, threshold=0.5, share=0.5, layers=1)
    reserve = TriAttentionReserve(share=0.5).scores(replace(inp, budget=24))
    lasting = {k: TriAttentionLasting().scores(replace(inp, budget=k)) for k in (24, 8)}  # (4 * 16 - 2 * 24) // 2
    policy.scores(inp)
    assert (inp.positions >= 0).sum(-1)[:, 0].tolist() == [[24, 24], [8, 8]]
    for layer, head, want, k in [(0, 0, reserve, 24), (0, 1, lasting[24], 24), (1, 0, lasting[8], 8),
                                 (1, 1, lasting[8], 8)]:
        kept = set((inp.positions[layer, 0, head] >= 0).nonzero().flatten().tolist())
        assert kept == set(want[layer, 0, head].topk(k).indices.tolist()), (layer, head)
