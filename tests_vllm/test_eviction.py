"""Eviction in vLLM's paged cache (issue 19, part 3): B = 128, 8 concurrent requests of different prompt lengths,
1,000 generated tokens each. Block accounting is read from vLLM's own block pool in the engine's process."""

from __future__ import annotations

from checks import keep_sets_equal_the_hf_path, paged_keys_are_the_hf_models_keys
from conftest import EVICTION_POOL, EVICTION_PROMPTS, EVICTION_TOKENS, OVERFLOW

from triattn_compile.vllm.paged import PagedSchedule

BUDGET = 128


def test_every_request_compacts_on_its_own_schedule(eviction_run):
    schedule = PagedSchedule(BUDGET, 128, eviction_run["pool"]["block_size"])
    lengths = [p + EVICTION_TOKENS for p in eviction_run["prompt_lengths"]]
    assert len(set(eviction_run["prompt_lengths"])) == len(EVICTION_PROMPTS)
    assert all(len(o) == EVICTION_TOKENS for o in eviction_run["outputs"])
    # a compaction at the start of each step writing B + 128 k, k >= 1, before the request's last token
    expected = sum(sum(schedule.compacts_at(p) for p in range(n - 1)) for n in lengths)
    count, tokens = OVERFLOW  # then the overflow requests (the first prompt)
    overflow = count * sum(schedule.compacts_at(p) for p in range(eviction_run["prompt_lengths"][0] + tokens - 1))
    compaction = eviction_run["reports"][0]["compaction"]
    assert [c["compactions"] for c in compaction] == [expected + overflow] and expected >= 8 * 6 and overflow


def test_blocks_bounded_and_returned(eviction_run):
    pool = eviction_run["pool"]
    bs = pool["block_size"]
    peak = PagedSchedule(BUDGET, 128, bs).peak_blocks
    # B + 128 tokens, plus the block being written while the dropped ones wait one step to be freed
    assert peak == (BUDGET + 128) // bs + 1 and pool["max_blocks_held"] <= peak
    assert pool["free_before"] == EVICTION_POOL - 1  # the pool holds the 8 peaks, no more
    assert pool["free_after"] == pool["free_before"]  # no leak
    lengths = [p + EVICTION_TOKENS for p in eviction_run["prompt_lengths"]]
    assert pool["freed"] > sum(n // bs for n in lengths) - 8 * peak


def test_admission_waits_for_blocks_instead_of_preempting(eviction_run):
    """12 requests at once in a pool that holds 8 peaks: 8 run, the rest wait and run as blocks come back; none is
    preempted (without the cap, 12 requests reach their third block in the same step and vLLM preempts, and the
    recompute past the budget stops the worker)."""
    pool = eviction_run["pool"]
    count, tokens = OVERFLOW
    assert pool["max_active"] == 8 and pool["max_running"] == 8
    assert pool["preemptions"] == 0
    assert len(eviction_run["overflow"]) == count and all(len(o) == tokens for o in eviction_run["overflow"])
    assert pool["free_at_end"] == pool["free_before"]


def test_keep_sets_equal_the_hf_path(eviction_run, stats_file):
    """The recorded compactions (vLLM's paged keys, positions, prompt, round) compacted by the HF path's
    ``Compressor`` keep the same slots per KV head as vLLM's worker did."""
    records = keep_sets_equal_the_hf_path(eviction_run["reports"][0], stats_file, BUDGET)
    assert len(records) == 10 and {r["round"] for r in records} >= {0, 1}


def test_paged_keys_are_the_hf_models_keys(eviction_run, model_dir, workdir):
    """The keys the worker gathered from vLLM's paged cache for a first compaction equal the post-RoPE keys the
    unmodified HF model caches for the same tokens."""
    paged_keys_are_the_hf_models_keys(eviction_run, model_dir, workdir, BUDGET)


def test_prompt_longer_than_budget_refused_in_one_line(eviction_run):
    """Refused by the front end's prompt check, like a prompt longer than max_model_len, before it reaches the engine:
    the engine then serves the overflow requests (a request left half-registered would hang them)."""
    refused = eviction_run["refused"]
    assert refused and refused["error"] == "VLLMValidationError" and "\n" not in refused["message"]
    assert refused["message"].startswith("TriAttention: prompt of 200 tokens is longer than the budget 128")
    assert eviction_run["overflow"] is not None
