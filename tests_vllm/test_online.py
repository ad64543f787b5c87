"""Online calibration in vLLM: no statistics file, so the plugin's backend adds the HF pass's query capture to vLLM's
graph and scores with the running means of every query the engine serves. One engine (Inductor), B = 128, two
requests, one long enough to compact."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ENGINE_ENV, HERE, hf_python, run

from triattn_compile.calibration.stats import TENSOR_NAMES
from triattn_compile.vllm.paged import PagedSchedule

BUDGET, TOKENS = 128, 400
PROMPTS = ["Hello", "def fibonacci(n):\n    if n < 2:\n        return n"]


@pytest.fixture(scope="module")
def online_run(model_dir, workdir) -> dict:
    out = workdir / "online.json"
    cmd = [sys.executable, str(HERE / "engine.py"), str(model_dir), str(out), "--triattn",
           json.dumps({"budget": BUDGET}), "--max-tokens", str(TOKENS), "--max-model-len", "1024"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    done = run(cmd, ENGINE_ENV)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(out.read_text())
    result["log"] = done.stderr
    return result


def fed_tokens(run_result: dict) -> list[list[int]]:
    """What the model was fed per request: the prompt, then every generated token but the last."""
    return [p + o[:-1] for p, o in zip(run_result["prompt_token_ids"], run_result["outputs"])]


def test_every_served_query_is_counted_once_and_the_start_up_run_is_not(online_run):
    report = online_run["reports"][0]
    assert report["online"]
    served = sum(len(ids) for ids in fed_tokens(online_run))
    assert report["online_stats"]["count"] == [float(served)] * len(report["layout"]["layers"])


def test_compacts_on_schedule_with_online_statistics_and_returns_every_block(online_run):
    pool = online_run["pool"]
    schedule = PagedSchedule(BUDGET, 128, pool["block_size"])
    lengths = [p + TOKENS for p in online_run["prompt_lengths"]]
    expected = sum(sum(schedule.compacts_at(p) for p in range(n - 1)) for n in lengths)
    assert online_run["reports"][0]["compaction"][0]["compactions"] == expected >= 2 * len(PROMPTS)
    assert pool["max_blocks_held"] <= schedule.peak_blocks and pool["free_after"] == pool["free_before"]


def test_layer0_statistics_equal_hf_calibration_on_the_same_tokens(online_run, model_dir, workdir):
    """Layer 0's queries depend on the tokens alone (no attention before them), so even after compactions the
    online sums equal ``triattn_compile.calibrate`` over the same token sequences in the HF model."""
    ids = workdir / "online-ids.json"
    ids.write_text(json.dumps(fed_tokens(online_run)))
    out = workdir / "online-hf-stats.json"
    done = run([hf_python(), str(HERE / "hf_reference.py"), str(model_dir), str(out), "--stats", str(ids)])
    assert done.returncode == 0, done.stderr[-3000:]
    hf = json.loads(out.read_text())
    online = online_run["reports"][0]["online_stats"]
    for name in TENSOR_NAMES:
        got, want = torch.tensor(online[name])[0], torch.tensor(hf[name])[0]
        scale = want.abs().max().item() if want.numel() else 1.0  # sum_pass is empty: the rotary covers every dim
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=name)
    assert torch.tensor(online["sum_re"]).abs().sum() > 0
