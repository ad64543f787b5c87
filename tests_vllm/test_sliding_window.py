"""Models with sliding-window layers through the plugin: Gemma-2 (a 64-token sliding-window layer, then a global
one; logit soft-capping) and Cohere-2 (the same, with interleaved RoPE in the windowed layer and none in the global
one: a NoPE layer, found in vLLM's graph as a slice of the fused projection). vLLM's hybrid KV cache manager gives
each kind of layer its own KV cache group, and its sliding-window manager already frees what leaves the window;
TriAttention compacts the full-attention group only. One engine per family (Inductor), B = 128 with the prompt scored
like any token (``protect_prompt`` false), 3 requests x 400 tokens in a pool of
their peaks in both groups; then one eager engine with the hybrid manager off, which is refused. The HF path is the
reference (keys, keep sets, tokens and log-probabilities), run with the window vLLM's model code attends with."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from checkpoints import tiny_windowed
from checks import keep_sets_equal_the_hf_path, layout_equals_hf_discovery, paged_keys_are_the_hf_models_keys
from conftest import ENGINE_ENV, HERE, _calibrate, _hf_layout, hf_python, last_line, run

from triattn_compile.vllm.paged import PagedSchedule

BUDGET, TOKENS, WINDOW = 128, 400, 64
PROMPTS = ["Hello", "def fibonacci(n):\n    if n < 2:\n        return n", "The quick brown fox jumps over the lazy dog"]
SCHEDULE = PagedSchedule(BUDGET, 128, 128)
WINDOW_PEAK = max(-(-(BUDGET + 128) // 128), -(-(WINDOW + 1) // 128) + 1) + 1  # TriAttentionScheduler.window_peak
POOL = len(PROMPTS) * (SCHEDULE.peak_blocks + WINDOW_PEAK) + 1  # both groups' peaks, + vLLM's null block
RECORDED = 4
SETTINGS = {"budget": BUDGET, "protect_prompt": False}
# vLLM 0.32's Cohere-2 attends one token more than its window (``commandr.py`` passes ``sliding_window + 1``, "the
# training convention"; transformers 5.23 attends exactly the window: without the plugin, vLLM's log-probabilities
# leave HF's at position 64 and equal HF's with a 65-token window to 1e-6). The HF reference of Cohere-2 is therefore
# the same checkpoint with vLLM's effective window; discovery and statistics use the checkpoint as it is.
VLLM_EXTRA_WINDOW = {"gemma2": 0, "cohere2": 1}


@pytest.fixture(scope="module", params=list(VLLM_EXTRA_WINDOW))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def windowed_dir(family, workdir):
    return tiny_windowed(workdir / family, family, window=WINDOW)


@pytest.fixture(scope="module")
def reference_dir(family, windowed_dir, workdir):
    """The checkpoint the HF path must run to attend as vLLM does (:data:`VLLM_EXTRA_WINDOW`)."""
    if not VLLM_EXTRA_WINDOW[family]:
        return windowed_dir
    folder = workdir / f"{family}-hf-window"
    shutil.copytree(windowed_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] += VLLM_EXTRA_WINDOW[family]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def windowed_stats(family, windowed_dir, workdir):
    return _calibrate(windowed_dir, workdir / f"{family}.safetensors")


def engine_cmd(model, out, stats, *extra) -> list[str]:
    cmd = [sys.executable, str(HERE / "engine.py"), str(model), str(out), "--triattn",
           json.dumps({**SETTINGS, "stats": str(stats)}), "--max-tokens", str(TOKENS), "--max-model-len", "1024",
           "--kv-blocks", str(POOL), *extra]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    return cmd


@pytest.fixture(scope="module")
def windowed_run(family, windowed_dir, windowed_stats, workdir) -> dict:
    out = workdir / f"{family}.json"
    done = run(engine_cmd(windowed_dir, out, windowed_stats, "--logprobs"),
               {**ENGINE_ENV, "TRIATTN_VLLM_RECORD": str(RECORDED)})
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


def test_layout_has_the_window(family, windowed_run, windowed_dir, workdir):
    found = windowed_run["reports"][0]["layout"]
    layout_equals_hf_discovery(found, _hf_layout(windowed_dir, workdir / f"{family}-layout.json"))
    assert [layer["window"] for layer in found["layers"]] == [WINDOW, 0]
    assert [layer["rotary_dim"] for layer in found["layers"]] == ([64, 64] if family == "gemma2" else [64, 0])


def test_only_the_full_attention_group_is_compacted(windowed_run):
    pool = windowed_run["pool"]
    assert pool["group_kinds"] == ["SlidingWindowSpec", "FullAttentionSpec"]
    lengths = [p + TOKENS for p in windowed_run["prompt_lengths"]]
    expected = sum(sum(SCHEDULE.compacts_at(p) for p in range(n - 1)) for n in lengths)
    assert windowed_run["reports"][0]["compaction"][0]["compactions"] == expected >= 2 * len(PROMPTS)
    sliding, full = pool["max_blocks_held_by_group"]
    assert full <= SCHEDULE.peak_blocks and sliding <= WINDOW_PEAK and pool["preemptions"] == 0
    assert pool["max_running"] == len(PROMPTS)
    assert pool["free_after"] == pool["free_before"] == POOL - 1  # no leak in either group


def test_keep_sets_equal_the_hf_path(windowed_run, windowed_stats):
    records = keep_sets_equal_the_hf_path(windowed_run["reports"][0], windowed_stats, BUDGET, protect_prompt=False)
    assert len(records) == RECORDED and all(r["layers"] == [1] for r in records)


def test_paged_keys_are_the_hf_models_keys(windowed_run, reference_dir, workdir):
    paged_keys_are_the_hf_models_keys(windowed_run, reference_dir, workdir, BUDGET)


def test_greedy_outputs_and_logprobs_equal_the_hf_path(family, windowed_run, reference_dir, windowed_stats, workdir):
    """All 400 tokens, through three compactions: vLLM's (the full-attention layer compacted in the paged cache, the
    sliding-window layer left to vLLM) equal ``optimize()``'s on the HF model (whose sliding-window layer keeps its
    newest B tokens, of which attention reads the window), and so do the chosen tokens' log-probabilities. The
    tokens alone would not tell keep sets apart on these random models (at B = 256 the HF path picks the same
    tokens for Gemma-2); the log-probabilities do (B = 256 moves them by 0.02-0.19)."""
    prompts = workdir / f"{family}-prompts.json"
    prompts.write_text(json.dumps(windowed_run["prompt_token_ids"]))
    out = workdir / f"{family}-hf-generate.json"
    done = run([hf_python(), str(HERE / "hf_reference.py"), str(reference_dir), str(out), "--generate", str(prompts),
                str(TOKENS), json.dumps({**SETTINGS, "stats": str(windowed_stats)})])
    assert done.returncode == 0, done.stderr[-3000:]
    hf = json.loads(out.read_text())
    assert hf["outputs"] == windowed_run["outputs"]
    for ours, theirs in zip(windowed_run["logprobs"], hf["logprobs"]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3


def test_hybrid_manager_off_is_refused(workdir):
    """With the hybrid KV cache manager off, the sliding-window layer reads the full-attention layer's block table,
    which compaction rewrites: refused in one line when vLLM makes its attention metadata builders (Gemma-2)."""
    model = tiny_windowed(workdir / "gemma2-no-hybrid", "gemma2", window=WINDOW)
    stats = _calibrate(model, workdir / "gemma2-no-hybrid.safetensors")
    done = run(engine_cmd(model, workdir / "gemma2-no-hybrid.json", stats, "--no-hybrid"),
               {**ENGINE_ENV, "VLLM_CPU_CI_ENV": "1"})
    assert done.returncode != 0
    assert ("TriAttention in vLLM: the sliding-window layers share a KV cache group with the full-attention layers"
            in done.stderr), last_line(done.stderr)
