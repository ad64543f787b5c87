"""``triattn bench``'s measurement: interleaved (lockstep) decodes compute what each method computes alone, count
only their own recompiles, and the issue-6 targets are read off the runs correctly (and can fail)."""

from __future__ import annotations

import statistics

import torch
from conftest import tiny_llama

from triattn_compile.bench import Run, run_methods, targets


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
