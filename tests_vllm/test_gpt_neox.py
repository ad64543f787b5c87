"""A family besides Llama through the plugin, end to end: GPT-NeoX, whose RoPE covers only the first quarter of each
head and which has no GQA. vLLM 0.32 runs it through its transformers backend, so the graph discovery reads is
transformers' code (``position_ids`` ``[1, T]``, an ``inv_freq`` input), not vLLM's own RoPE. One engine (Inductor),
B = 128 with the prompt not protected (``protect_prompt`` false: scored like any token, as the official vLLM runtime
does), 3 requests x 400 tokens in a pool of their 3 peaks, one of them with a prompt longer than the budget."""

from __future__ import annotations

import json
import sys

import pytest
from checkpoints import tiny_gpt_neox
from checks import keep_sets_equal_the_hf_path, layout_equals_hf_discovery, paged_keys_are_the_hf_models_keys
from conftest import ENGINE_ENV, HERE, _calibrate, _hf_layout, run

from triattn_compile.vllm.paged import PagedSchedule

BUDGET, TOKENS = 128, 400
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 18)  # 128 < tokens <= 256
PROMPTS = ["Hello", "def fibonacci(n):\n    if n < 2:\n        return n", LONG]
SETTINGS = {"budget": BUDGET, "protect_prompt": False}
RECORDED = 4


@pytest.fixture(scope="module")
def neox_dir(workdir):
    return tiny_gpt_neox(workdir / "gpt-neox")


@pytest.fixture(scope="module")
def neox_stats(neox_dir, workdir):
    return _calibrate(neox_dir, workdir / "gpt-neox.safetensors")


@pytest.fixture(scope="module")
def neox_run(neox_dir, neox_stats, workdir) -> dict:
    out = workdir / "gpt-neox.json"
    pool = len(PROMPTS) * PagedSchedule(BUDGET, 128, 128).peak_blocks + 1  # + vLLM's null block
    cmd = [sys.executable, str(HERE / "engine.py"), str(neox_dir), str(out), "--triattn",
           json.dumps({**SETTINGS, "stats": str(neox_stats)}), "--max-tokens", str(TOKENS),
           "--max-model-len", "1024", "--kv-blocks", str(pool), "--long-prompt", "300"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    done = run(cmd, {**ENGINE_ENV, "TRIATTN_VLLM_RECORD": str(RECORDED)})
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


def test_partial_rotary_layout_equals_hf_discovery(neox_run, neox_dir, workdir):
    found = neox_run["reports"][0]["layout"]
    layout_equals_hf_discovery(found, _hf_layout(neox_dir, workdir / "gpt-neox-layout.json"))
    assert found["head_dim"] == 64 and {layer["rotary_dim"] for layer in found["layers"]} == {16}
    assert found["num_kv_heads"] == found["num_heads"] == 4


def test_compacts_on_schedule_and_returns_every_block(neox_run):
    pool = neox_run["pool"]
    schedule = PagedSchedule(BUDGET, 128, pool["block_size"])
    lengths = [p + TOKENS for p in neox_run["prompt_lengths"]]
    assert all(len(o) == TOKENS for o in neox_run["outputs"])
    expected = sum(sum(schedule.compacts_at(p) for p in range(n - 1)) for n in lengths)
    assert neox_run["reports"][0]["compaction"][0]["compactions"] == expected >= 2 * len(PROMPTS)
    assert pool["max_blocks_held"] <= schedule.peak_blocks and pool["preemptions"] == 0
    assert pool["free_after"] == pool["free_before"] == len(PROMPTS) * schedule.peak_blocks


def test_keep_sets_equal_the_hf_path(neox_run, neox_stats):
    records = keep_sets_equal_the_hf_path(neox_run["reports"][0], neox_stats, BUDGET, protect_prompt=False)
    assert len(records) == RECORDED and {r["round"] for r in records} == {0, 1}
    assert any(r["prompt"] > BUDGET for r in records)  # a prompt that cannot be kept whole: scored with the rest


def test_unprotected_prompt_longer_than_the_budget(neox_run):
    """As on the HF path with ``protect_prompt=False``: a prompt of up to budget + divide_length tokens is taken and
    compacted like any tokens (its request ran on the schedule above: compacted prompt tokens away), a longer one is
    refused in one line by the front end."""
    assert BUDGET < max(neox_run["prompt_lengths"]) <= BUDGET + 128
    refused = neox_run["refused"]
    assert refused and refused["error"] == "VLLMValidationError" and "\n" not in refused["message"]
    assert refused["message"].startswith("TriAttention: prompt of 300 tokens is longer than budget + divide_length 256")


def test_paged_keys_are_the_hf_models_keys(neox_run, neox_dir, workdir):
    paged_keys_are_the_hf_models_keys(neox_run, neox_dir, workdir, BUDGET)
