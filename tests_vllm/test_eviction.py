"""Eviction in vLLM's paged cache (issue 19, part 3): B = 128, 8 concurrent requests of different prompt lengths,
1,000 generated tokens each. Block accounting is read from vLLM's own block pool in the engine's process."""

from __future__ import annotations

import json

import torch
from conftest import EVICTION_PROMPTS, EVICTION_TOKENS

from triattn_compile.config import TriAttentionConfig
from triattn_compile.schedule import Compressor
from triattn_compile.vllm.discovery import layout_from_dict
from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.statsfile import load_for_layout

BUDGET = 128


def test_every_request_compacts_on_its_own_schedule(eviction_run):
    schedule = PagedSchedule(BUDGET, 128, eviction_run["pool"]["block_size"])
    lengths = [p + EVICTION_TOKENS for p in eviction_run["prompt_lengths"]]
    assert len(set(eviction_run["prompt_lengths"])) == len(EVICTION_PROMPTS)
    assert all(len(o) == EVICTION_TOKENS for o in eviction_run["outputs"])
    # a compaction at the start of each step writing B + 128 k, k >= 1, before the request's last token
    expected = sum(sum(schedule.compacts_at(p) for p in range(n - 1)) for n in lengths)
    compaction = eviction_run["reports"][0]["compaction"]
    assert [c["compactions"] for c in compaction] == [expected] and expected >= 8 * 6


def test_blocks_bounded_and_returned(eviction_run):
    pool = eviction_run["pool"]
    bs = pool["block_size"]
    # B + 128 tokens, plus the block being written while the dropped ones wait one step to be freed
    assert pool["max_blocks_held"] <= (BUDGET + 128) // bs + 1
    assert pool["free_after"] == pool["free_before"]  # no leak
    lengths = [p + EVICTION_TOKENS for p in eviction_run["prompt_lengths"]]
    assert pool["freed"] > sum(n // bs for n in lengths) - 8 * ((BUDGET + 128) // bs + 1)


def test_keep_sets_equal_the_hf_path(eviction_run, stats_file):
    """The recorded compactions (vLLM's paged keys, positions, prompt, round) compacted by the HF path's
    ``Compressor`` keep the same slots per KV head as vLLM's worker did."""
    report = eviction_run["reports"][0]
    layout = layout_from_dict(report["layout"]).layout
    compressor = Compressor(TriAttentionConfig(budget=BUDGET), layout, torch.device("cpu"))
    compressor.stats = load_for_layout(stats_file, layout)
    records = report["compaction"][0]["records"]
    assert len(records) == 10 and {r["round"] for r in records} >= {0, 1}
    for record in records:
        keys, values = ([torch.tensor(x) for x in record[name]] for name in ("keys", "values"))
        n = keys[0].shape[1]
        cache = compressor.new_cache(1, torch.device("cpu"), torch.float32)
        for layer, k, v in zip(cache.layers, keys, values):
            layer.keys[0, :, :n], layer.values[0, :, :n] = k, v
        cache.slot_pos[:, 0, :, :n] = torch.tensor(record["positions"])[0]
        cache.fill[0], cache.prompt[0], cache.row_rounds[0] = n, record["prompt"], record["round"]
        cache.seen = record["position"]
        assert compressor.compact(cache, 0).tolist() == record["keep"], json.dumps(record["position"])


def test_prompt_longer_than_budget_refused_in_one_line(eviction_run):
    message = eviction_run["refused"]
    assert message and "\n" not in message
    assert message.startswith("TriAttention: prompt of 200 tokens is longer than the budget 128")
