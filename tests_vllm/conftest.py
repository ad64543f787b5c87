"""Fixtures of the vLLM leg (run with the vLLM venv's python: ``python -m pytest -q tests_vllm``).

Checkpoints are random 2-layer Llamas with SmolLM2's tokenizer, built in seconds. The reference side (the project's
HF discovery and ``triattn calibrate``) runs in the main venv (transformers >= 5.23): ``TRIATTN_HF_PYTHON``, else the
repo's ``.venv/bin/python``. Engines run one at a time, each in its own process (``tests_vllm/engine.py``), with
the session fixtures below; ``VLLM_CPU_CI_ENV=1`` is not set, so they compile with vLLM's CPU default, Inductor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from checkpoints import tiny_llama  # noqa: E402


def hf_python() -> str:
    """The main venv's python (transformers >= 5.23), where the project's HF path runs."""
    for candidate in (os.environ.get("TRIATTN_HF_PYTHON"), REPO / ".venv/bin/python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError("set TRIATTN_HF_PYTHON to the python of the main venv (README: set-up), or create "
                       f"{REPO / '.venv'}")


def run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``cmd`` under ``nice`` (the machine is shared), from the repo root; output captured."""
    return subprocess.run(["nice", "-n", "15", *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def run_engine(model: Path, out: Path, triattn: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(HERE / "engine.py"), str(model), str(out)]
    if triattn is not None:
        cmd += ["--triattn", json.dumps(triattn)]
    return run(cmd, ENGINE_ENV)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def model_dir(workdir) -> Path:
    return tiny_llama(workdir / "llama")


@pytest.fixture(scope="session")
def other_model_dir(workdir) -> Path:
    """The same shapes, another RoPE base: only its frequencies tell it apart."""
    return tiny_llama(workdir / "llama-theta5e5", rope_theta=500000.0, seed=1)


def _hf_layout(model: Path, out: Path) -> dict:
    done = run([hf_python(), str(HERE / "hf_reference.py"), str(model), str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _calibrate(model: Path, out: Path) -> Path:
    done = run([hf_python(), "-m", "triattn_compile", "calibrate", "--model", str(model), "--text",
                str(REPO / "README.md"), "--tokens", "600", "--out", str(out), "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def hf_layout(model_dir, workdir) -> dict:
    return _hf_layout(model_dir, workdir / "hf-layout.json")


@pytest.fixture(scope="session")
def stats_file(model_dir, workdir) -> Path:
    return _calibrate(model_dir, workdir / "llama.safetensors")


@pytest.fixture(scope="session")
def other_stats_file(other_model_dir, workdir) -> Path:
    return _calibrate(other_model_dir, workdir / "llama-theta5e5.safetensors")


@pytest.fixture(scope="session")
def plain_run(model_dir, workdir) -> dict:
    """vLLM without TriAttention (the plugin installed, the setting absent)."""
    out = workdir / "plain.json"
    done = run_engine(model_dir, out)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def triattn_run(model_dir, workdir, stats_file, plain_run) -> dict:
    """vLLM with TriAttention on and this model's statistics (started after ``plain_run`` has finished)."""
    out = workdir / "triattn.json"
    done = run_engine(model_dir, out, {"budget": 256, "stats": str(stats_file)})
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(out.read_text())
    result["log"] = done.stderr
    return result


EVICTION_PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "In 1905, a patent clerk in Bern wrote",
                    "def fibonacci(n):\n    if n < 2:\n        return n", "Once upon a time, in a land far away, there",
                    "SELECT name, email FROM users WHERE", "The mitochondria is the powerhouse of the cell, and",
                    "Roses are red, violets are blue, sugar is sweet, and so are you. The end of the"]
EVICTION_TOKENS = 1000
EVICTION_POOL = 8 * 3 + 1  # blocks: the 8 requests' peaks at B = 128 (3 blocks each), plus vLLM's null block
OVERFLOW = (12, 300)  # then 12 requests of 300 tokens: more than the pool holds at their peaks


@pytest.fixture(scope="session")
def eviction_run(model_dir, workdir, stats_file, triattn_run) -> dict:
    """B = 128, 8 concurrent requests of different prompt lengths, 1,000 generated tokens each, in a pool that holds
    their 8 peaks; the first compactions recorded (keys, positions, keep sets); then a prompt longer than the budget,
    then 12 requests at once (:data:`OVERFLOW`)."""
    out = workdir / "eviction.json"
    cmd = [sys.executable, str(HERE / "engine.py"), str(model_dir), str(out), "--triattn",
           json.dumps({"budget": 128, "stats": str(stats_file)}), "--max-tokens", str(EVICTION_TOKENS),
           "--max-model-len", "2048", "--long-prompt", "200", "--kv-blocks", str(EVICTION_POOL), "--overflow",
           *map(str, OVERFLOW)]
    for prompt in EVICTION_PROMPTS:
        cmd += ["--prompt", prompt]
    done = run(cmd, {**ENGINE_ENV, "TRIATTN_VLLM_RECORD": "10"})
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())
