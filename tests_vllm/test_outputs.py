"""With TriAttention on but nothing evicting yet, vLLM's greedy outputs are those of vLLM without it."""

from __future__ import annotations


def test_greedy_outputs_unchanged(plain_run, triattn_run):
    assert len(plain_run["outputs"]) == 3 and all(len(o) == 24 for o in plain_run["outputs"])
    assert triattn_run["outputs"] == plain_run["outputs"]
