"""``triattn bench``'s measurement: interleaved (lockstep) decodes compute what each method computes alone, count
only their own recompiles, and the issue-6 targets are read off the runs correctly (and can fail)."""

from __future__ import annotations

import statistics
import sys

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc
from triattn_compile.bench import Run, delayed, lockstep, run_methods, targets

# the optimized methods compact every DIVIDE steps (optimize's divide_length; 128 by default), so that runs of a few
# dozen steps on the tiny model see several compactions: budget 16 + 8 slots, a compaction every 8 tokens past 24
DIVIDE, BUDGET = 8, 16
OPT = f"B={BUDGET}"
STEPS = 40  # 4 prompt + 39 decoded tokens: compactions at 24, 32 and 40 tokens
TWIN_POSITION = 20


@pytest.fixture(scope="module")
def interleaved() -> tuple[torch.nn.Module, torch.Tensor, list[Run]]:
    """The tiny model, its prompt and one interleaved run of every method, ``OPT`` with a twin decode up to
    ``TWIN_POSITION`` (compiling is most of the time: the slow leg's lockstep test)."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    runs = run_methods(model, ids, STEPS, ["sdpa", "compiled", OPT], progress=False, interleave=True, twins=(OPT,),
                       twin_position=TWIN_POSITION, divide_length=DIVIDE)
    return model, ids, runs


@pytest.mark.slow
def test_lockstep_decodes_equal_sequential_ones(interleaved) -> None:
    model, ids, together = interleaved
    steps = STEPS
    alone = run_methods(model, ids, steps, ["sdpa", OPT], progress=False, interleave=False, divide_length=DIVIDE)
    by_method = {r.method: r for r in together}
    for run in alone:
        assert by_method[run.method].tokens == run.tokens, run.method
    for run in together:
        assert len(run.step_seconds) == steps - 3
        assert run.recompiles_after_warmup == 0, run.method  # the others' compilations are not counted as its own
    compressed, full = by_method[OPT], by_method["sdpa"]
    assert compressed.compactions >= 2
    assert compressed.compaction_seconds > 0 and 0 < compressed.compaction_share(steps - 3) < 1
    assert compressed.peak_kv_bytes < full.peak_kv_bytes
    assert not tc.is_optimized(model)  # the optimized methods ran on replicas sharing the weights
    # the twin decode of OPT (test_a_twin_decode_ends_in_the_same_cycles_as_its_method: its schedule)
    assert len(together) == 3 and not together[0].twin_step_seconds and not together[1].twin_step_seconds
    assert len(compressed.twin_step_seconds) == TWIN_POSITION - 4  # timed steps up to position ~TWIN_POSITION
    assert compressed.recompiles_after_warmup == 0  # the twin's compilation is not counted in the main decode


def test_a_twin_decode_ends_in_the_same_cycles_as_its_method() -> None:
    log = []

    def decode(name: str, steps: int):
        for step in range(steps):
            log.append((name, step))
            yield
        return Run(name, 1, 0, step_seconds=[0.0] * steps)

    lockstep([decode("main", 10), delayed(decode("twin", 4), 10 - 4)])
    cycles = [[name for name, _ in log[i:i + 2]] for i in range(0, len(log), 2)]
    assert [c for c in cycles if c == ["main", "twin"]] == [["main", "twin"]] * 4
    assert log[-2:] == [("main", 9), ("twin", 3)]  # both take their last step in the last cycle


def _run(method: str, seconds: list[float], kv_bytes: int, prompt: int = 100) -> Run:
    return Run(method, 1, prompt, step_seconds=seconds, peak_kv_bytes=kv_bytes)


def test_targets_read_off_the_runs() -> None:
    steps = 7900
    full = _run("sdpa", [0.04 + 0.11 * i / steps for i in range(steps)], 8000)
    compiled = _run("compiled", [0.035] * steps, 8000)
    fast = _run("B=1024", [0.036] * steps, 1150)
    rows = {r["target"].split(":")[0].split(" (")[0]: r for r in targets([full, compiled, fast])}
    expected = 0.036 / statistics.median(full.step_seconds[-100:])  # medians over the last 100 steps
    assert abs(rows["step latency at ~8K"]["measured"] - expected) < 1e-4
    assert all(r["met"] == "yes" for r in rows.values()), rows
    slow = _run("B=1024", [0.04] * steps, 1200)  # 14% slower than compiled, KV above (1024 + 128) / 8000
    rows = {r["target"]: r for r in targets([full, compiled, slow])}
    failed = [name for name, r in rows.items() if r["met"] == "NO"]
    assert any(name.startswith("short generation") for name in failed)
    assert any(name.startswith("peak KV") for name in failed)


def test_flatness_is_timed_against_the_twin_when_there_is_one() -> None:
    steps = 7900
    full = _run("sdpa", [0.04 + 0.11 * i / steps for i in range(steps)], 8000)
    drifting = _run("B=1024", [0.036 * (1 + 0.3 * i / steps) for i in range(steps)], 1150)  # the machine slows down
    flat = lambda rows: next(r for r in rows if r["target"].startswith("step latency at ~8K /"))
    assert flat(targets([full, drifting]))["met"] == "NO"  # the same generation: drift passes for growth
    drifting.twin_step_seconds = drifting.step_seconds[-1100:]  # same cycles, same speed: flat
    rows = targets([full, drifting])
    assert flat(rows)["met"] == "yes" and flat(rows)["measured"] == 1.0
    info = next(r for r in rows if "drift included" in r["target"])
    assert info["goal"] == "" and info["measured"] > 1.2
    drifting.twin_step_seconds = [0.030] * 1100  # the step at ~8K really is 36 % slower than at ~1200
    assert flat(targets([full, drifting]))["met"] == "NO"


@pytest.mark.slow
def test_feeding_a_context_compacts_as_decoding_it_does() -> None:
    """``_feed`` gives an optimized model at most its free slots per call, so after N tokens its cache holds the
    same positions as after decoding the N tokens one by one (scoring needs no live query)."""
    import triattn_compile as tc
    from triattn_compile.bench import _feed

    model = tiny_llama()
    context = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    options = dict(budget=BUDGET, divide_length=DIVIDE, protect_prompt=False)
    chunked = _feed(tc.optimize(model, **options), context)  # chunks of 24, 8, 8, 8, 8 and 4 tokens
    tc.restore(model)
    one_by_one = _feed(tc.optimize(model, **options), context[:, :1])
    optimized = model
    for t in range(1, context.shape[1]):
        one_by_one = optimized(input_ids=context[:, t:t + 1], past_key_values=one_by_one,
                               use_cache=True).past_key_values
    assert chunked.tokens_seen() == one_by_one.tokens_seen() == 60
    assert chunked.compactions() == one_by_one.compactions() >= 2
    kept = lambda cache: cache.slot_pos.sort(-1).values
    assert torch.equal(kept(chunked), kept(one_by_one))


@pytest.mark.slow
def test_context_latency_and_serving_rows() -> None:
    from triattn_compile.bench import context_latency, serving

    model = tiny_llama()
    context = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    # 8 timed steps after 2 warm-up ones: the optimized method compacts while it is timed
    rows = list(context_latency(model, context, [1, 4], ["sdpa", "compiled", OPT], steps=8, divide_length=DIVIDE))
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for b in (1, 4) for m in ("sdpa", "compiled", OPT)]
    assert all(r["context"] == 60 and r["ms/step"] > 0 for r in rows)
    assert all(r["recompiles"] == 0 for r in rows), rows  # nothing compiles while the steps are timed
    assert rows[0]["step vs sdpa"] == 1.0
    assert not tc.is_optimized(model)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head_dim, float32
    # a cap of 2 full-attention sequences; the optimized method fits 4 (the batch above: Inductor's cache holds its
    # decode graph)
    served = list(serving(model, context, 2 * 60 * per_token, [BUDGET], steps=8, divide_length=DIVIDE))
    assert served[0]["method"] == "sdpa" and served[0]["max batch"] == 2
    assert served[1]["max batch"] > 2 * 60 // (BUDGET + DIVIDE) // 2  # roughly N / capacity more sequences fit


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_without_the_bench_extra_bench_and_eval_say_what_to_install(command, capsys, monkeypatch):
    from triattn_compile.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec finds nothing
    code = main([command, "--model", "/nonexistent"])  # checked before the model is loaded
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"triattn {command}: error: matplotlib is not installed")
    assert 'pip install "triattn_compile[bench]"' in err
