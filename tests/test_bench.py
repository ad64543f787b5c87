"""``triattn bench``'s measurement: interleaved (lockstep) decodes compute what each method computes alone, count
only their own recompiles, and the issue-6 targets are read off the runs correctly (and can fail)."""

from __future__ import annotations

import statistics

import torch
from conftest import tiny_llama

from triattn_compile.bench import Run, delayed, lockstep, run_methods, targets


def test_lockstep_decodes_equal_sequential_ones() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    steps = 400
    together = run_methods(model, ids, steps, ["sdpa", "compiled", "B=132"], progress=False, interleave=True)
    alone = run_methods(model, ids, steps, ["sdpa", "B=132"], progress=False, interleave=False)
    by_method = {r.method: r for r in together}
    for run in alone:
        assert by_method[run.method].tokens == run.tokens, run.method
    for run in together:
        assert len(run.step_seconds) == steps - 3
        assert run.recompiles_after_warmup == 0, run.method  # the others' compilations are not counted as its own
    compressed, full = by_method["B=132"], by_method["sdpa"]
    assert compressed.compactions >= 2
    assert compressed.compaction_seconds > 0 and 0 < compressed.compaction_share(steps - 3) < 1
    assert compressed.peak_kv_bytes < full.peak_kv_bytes
    assert not hasattr(model, "_triattn_state")  # the optimized methods ran on replicas sharing the weights


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

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    runs = run_methods(model, ids, 300, ["sdpa", "B=132"], progress=False, twins=("B=132",), twin_position=150)
    assert len(runs) == 2 and not runs[0].twin_step_seconds
    assert len(runs[1].twin_step_seconds) == 150 - 4  # timed steps up to position ~150
    assert runs[1].recompiles_after_warmup == 0  # the twin's compilation is not counted in the main decode


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


def test_feeding_a_context_compacts_as_decoding_it_does() -> None:
    """``_feed`` gives an optimized model at most its free slots per call, so after N tokens its cache holds the
    same positions as after decoding the N tokens one by one (scoring needs no live query)."""
    import triattn_compile as tc
    from triattn_compile.bench import _feed

    model = tiny_llama()
    context = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(2))
    chunked = _feed(tc.optimize(model, budget=132, protect_prompt=False), context)
    tc.restore(model)
    one_by_one = _feed(tc.optimize(model, budget=132, protect_prompt=False), context[:, :1])
    optimized = model
    for t in range(1, context.shape[1]):
        one_by_one = optimized(input_ids=context[:, t:t + 1], past_key_values=one_by_one,
                               use_cache=True).past_key_values
    assert chunked.tokens_seen() == one_by_one.tokens_seen() == 700
    assert chunked.compactions() == one_by_one.compactions() >= 2
    kept = lambda cache: cache.slot_pos.sort(-1).values
    assert torch.equal(kept(chunked), kept(one_by_one))


def test_context_latency_and_serving_rows() -> None:
    from triattn_compile.bench import context_latency, serving

    model = tiny_llama()
    context = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(3))
    rows = list(context_latency(model, context, [1, 4], ["sdpa", "compiled", "B=132"], steps=8))
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for b in (1, 4) for m in ("sdpa", "compiled", "B=132")]
    assert all(r["context"] == 600 and r["ms/step"] > 0 for r in rows)
    assert all(r["recompiles"] == 0 for r in rows), rows  # nothing compiles while the steps are timed
    assert rows[0]["step vs sdpa"] == 1.0
    assert not hasattr(model, "_triattn_state")
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head_dim, float32
    served = list(serving(model, context, 64 * 600 * per_token, [132], steps=8))
    assert served[0]["method"] == "sdpa" and served[0]["max batch"] == 64
    assert served[1]["max batch"] > 64 * 600 // (132 + 128) // 2  # roughly N / capacity more sequences fit
