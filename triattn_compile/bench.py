"""``triattn bench``: decode speed and memory of full attention vs TriAttention, measured side by side in one process.

Every method runs the same greedy decode loop over the same prompt (real text), one token per step, no stopping at
EOS, and is timed per step (with a device sync on CUDA). Methods:

* ``sdpa``: the unmodified transformers model with a ``DynamicCache``, as users run it today;
* ``compiled``: the same model under plain ``torch.compile`` (Inductor);
* ``B=<budget>``: ``triattn_compile.optimize(model, budget=<budget>)`` (Inductor, TriAttention policy).

A run of ``L`` tokens also gives the figures of every shorter length (its first ``n`` steps are the same decode).
By default the methods run interleaved, one decode step each in turn (:func:`lockstep`), so that the ratios between
them do not depend on the machine's speed drifting during a long run.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from triattn_compile.cache import cache_keyword, returned_cache
from triattn_compile.config import TriAttentionConfig

RSS_SAMPLE_EVERY = 64
DIVIDE_LENGTH = TriAttentionConfig.divide_length  # optimize()'s compaction period unless a caller passes another


@dataclass
class Run:
    """One method's decode: per-step latencies and what it cost."""

    method: str
    batch: int
    prompt_tokens: int
    step_seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0  # prefill + first two decode steps (includes compilation)
    recompiles_after_warmup: int = 0
    peak_kv_bytes: int = 0
    peak_rss_bytes: int = 0  # process RSS sampled during the run
    compaction_seconds: float = 0.0
    compaction_cumulative: list[float] = field(default_factory=list)  # compaction s since warm-up, per timed step
    compactions: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    # a second decode of the same method, started late so that its last steps (positions up to ~1,200) run in the
    # same lockstep cycles as this run's last steps: the early/late latency ratio without the machine's drift
    twin_step_seconds: list[float] = field(default_factory=list)

    def tokens_per_second(self, steps: int) -> float:
        return self.batch * steps / sum(self.step_seconds[:steps])

    def compaction_share(self, steps: int) -> float:
        """Share of the first ``steps`` timed steps spent in scoring and compaction."""
        if not self.compaction_cumulative or not steps:
            return 0.0
        return self.compaction_cumulative[steps - 1] / sum(self.step_seconds[:steps])

    def latency_at(self, position: int, window: int = 100) -> float:
        """Median step latency over the ``window`` decode steps ending at absolute ``position``."""
        end = max(min(position - self.prompt_tokens, len(self.step_seconds)), window)
        return statistics.median(self.step_seconds[end - window:end])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def decode_steps(forward, make_cache, ids: torch.Tensor, steps: int, method: str, on_step=None,
                 compaction_clock=None) -> Generator[None, None, Run]:
    """Greedy decode of ``steps`` tokens after the prompt ``ids`` ``[B, P]``, yielding after every forward call and
    returning the :class:`Run`; the first token comes from prefill. Only this method's own calls are timed and only
    the graphs compiled during them count as its recompiles, so several decodes can be interleaved
    (:func:`lockstep`). ``compaction_clock()``: seconds spent compacting so far (read after each timed step)."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    run = Run(method, ids.shape[0], ids.shape[1])
    cache, keyword = make_cache(), cache_keyword(forward)
    start = time.perf_counter()
    out = forward(input_ids=ids, **{keyword: cache}, use_cache=True)
    cache = returned_cache(out)  # an optimized model creates its own compressed cache on the first call
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    generated = [token]
    warmup = time.perf_counter() - start
    yield
    for step in range(1, steps):
        graphs = _graphs()
        t0 = time.perf_counter()
        out = forward(input_ids=token, **{keyword: cache}, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        if step <= 2:
            warmup += t1 - t0
            run.warmup_seconds = warmup
            warm_compaction = compaction_clock() if compaction_clock is not None else 0.0
        else:
            run.step_seconds.append(t1 - t0)
            run.recompiles_after_warmup += _graphs() - graphs
            if compaction_clock is not None:
                run.compaction_cumulative.append(compaction_clock() - warm_compaction)
        generated.append(token)
        if step % RSS_SAMPLE_EVERY == 0:
            run.peak_rss_bytes = max(run.peak_rss_bytes, _rss_bytes())
            run.peak_kv_bytes = max(run.peak_kv_bytes, _kv_bytes(cache))
        if on_step is not None:
            on_step()
        yield
    run.peak_kv_bytes = max(run.peak_kv_bytes, _kv_bytes(cache))
    run.tokens = torch.cat(generated, dim=1).tolist()
    return run


def delayed(decode: Generator[None, None, Run], cycles: int) -> Generator[None, None, Run]:
    """``decode`` started after ``cycles`` lockstep cycles (it does nothing before)."""
    for _ in range(cycles):
        yield
    return (yield from decode)


def lockstep(decodes: list[Generator[None, None, Run]]) -> list[Run]:
    """Advance the decodes one forward call each in turn until all are done; their runs, in order. A slowdown of
    the machine during the measurement (another tenant, frequency, memory state) then falls on every method alike."""
    runs: list[Run | None] = [None] * len(decodes)
    live = dict(enumerate(decodes))
    while live:
        for i, gen in list(live.items()):
            try:
                next(gen)
            except StopIteration as done:
                runs[i] = done.value
                del live[i]
    return runs


def _replica(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors: ``optimize`` modifies its model object in
    place, and every method must read the very same weights."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


def real_text() -> str:
    """The GPL-3 licence text that Debian ships (offline, written by the FSF), or this module's docstring."""
    source = Path("/usr/share/common-licenses/GPL-3")
    return source.read_text() if source.exists() else __doc__


def text_ids(tokenizer, tokens: int) -> torch.Tensor:
    """``[1, tokens]`` ids of :func:`real_text`, repeated as needed."""
    ids = torch.tensor(tokenizer(real_text()).input_ids)
    return ids.repeat(tokens // len(ids) + 1)[:tokens][None]


def prompt_ids(tokenizer, batch: int, text_tokens: int = 64) -> torch.Tensor:
    """A chat prompt asking to continue a passage of real text (:func:`real_text`)."""
    from triattn_compile.loading import chat_ids

    passage = tokenizer.decode(tokenizer(real_text()).input_ids[:text_tokens])
    ids = chat_ids(tokenizer, "Continue this text, at length:\n\n" + passage)
    return ids.expand(batch, -1).contiguous()


def run_methods(model, ids: torch.Tensor, steps: int, methods: list[str], progress: bool = True,
                interleave: bool = True, twins: tuple[str, ...] = (), twin_position: int = 1200,
                divide_length: int = DIVIDE_LENGTH) -> list[Run]:
    """Decode with each method on the same weights. ``interleave``: all methods advance together, one step each in
    turn (:func:`lockstep`), so their ratios do not depend on when each ran; the peak RSS is then the process's.
    Otherwise one method after the other, Dynamo reset in between (each method's own peak RSS).

    ``twins`` (interleaved only): methods that also get a second decode up to ``twin_position``, started late so
    that it ends with the first (:attr:`Run.twin_step_seconds`): the step at the end of a long generation and the
    step at ``twin_position`` are then timed in the same cycles, so a slow drift of the machine cannot pass for a
    latency that grows with the position.

    ``divide_length``: the compaction period of the ``B=<budget>`` methods (``optimize(..., divide_length=)``); a
    short one lets a short run see several compactions (tests)."""
    from transformers import DynamicCache

    import triattn_compile as tc

    for method in methods:
        if method not in ("sdpa", "compiled"):
            _budget(method)
    if twins and not (interleave and set(twins) <= set(methods)):
        raise ValueError(f"twins {list(twins)} need interleave=True and must be among the methods {methods}")
    twin_steps = twin_position - ids.shape[1] + 3  # its last timed step is at position ~twin_position
    if twins and not 3 < twin_steps <= steps:
        raise ValueError(f"a twin decode up to position {twin_position} needs a prompt shorter than it and at least "
                         f"{twin_steps} steps (got a {ids.shape[1]}-token prompt, {steps} steps)")
    full_cache = lambda: DynamicCache(config=model.config)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(steps - 1) * len(methods) + (twin_steps - 1) * len(twins),
                   desc=f"{'+'.join(methods)} batch {ids.shape[0]}", unit="step", leave=False)
    on_step = bar.update if bar else None

    def prepare(method: str, steps: int = steps) -> tuple[Generator[None, None, Run], Callable[[Run], None]]:
        """The method's decode and what fills in its run afterwards."""
        if method == "sdpa":
            return decode_steps(model.forward, full_cache, ids, steps, method, on_step), lambda run: None
        if method == "compiled":
            return decode_steps(torch.compile(model.forward), full_cache, ids, steps, method, on_step), lambda r: None
        replica = tc.optimize(_replica(model), budget=_budget(method), divide_length=divide_length)
        state = tc.inspect(replica)

        def finish(run: Run) -> None:
            cache = tc.current_cache(replica)
            run.compaction_seconds, run.compactions = state.compaction_seconds, cache.compactions()
            run.peak_kv_bytes = cache.kv_bytes()

        clock = lambda: state.compaction_seconds
        return decode_steps(replica.forward, lambda: None, ids, steps, method, on_step, clock), finish

    torch._dynamo.reset()
    gc.collect()
    if interleave:
        prepared = [prepare(m) for m in methods]
        late = [delayed(prepare(m, twin_steps)[0], steps - twin_steps) for m in twins]
        done = lockstep([gen for gen, _ in prepared] + late)
        runs = done[:len(methods)]
        for run, (_, finish) in zip(runs, prepared):
            finish(run)
        for method, twin in zip(twins, done[len(methods):]):
            runs[methods.index(method)].twin_step_seconds = twin.step_seconds
    else:
        runs = []
        for method in methods:
            gen, finish = prepare(method)
            runs.append(lockstep([gen])[0])
            finish(runs[-1])
            torch._dynamo.reset()
            gc.collect()
    if bar:
        bar.close()
    torch._dynamo.reset()
    return runs


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (``len`` when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summary_rows(runs: list[Run], lengths: list[int]) -> list[dict]:
    """One row per (method, length): throughput, memory, compile and compaction figures."""
    reference = runs[0]
    rows = []
    for run in runs:
        for length in lengths:
            steps = min(length, len(run.step_seconds))
            rows.append({
                "method": run.method, "batch": run.batch, "tokens": length,
                "tok/s": round(run.tokens_per_second(steps), 2),
                f"tok/s vs {reference.method}": round(run.tokens_per_second(steps) / reference.tokens_per_second(steps),
                                                      3),
                "peak KV MiB": round(run.peak_kv_bytes / 2**20, 1),
                "peak RSS MiB": round(run.peak_rss_bytes / 2**20),
                "warm-up s": round(run.warmup_seconds, 1),
                "recompiles": run.recompiles_after_warmup,
                "compaction %": round(100 * run.compaction_share(steps), 2),
                "same tokens as first": first_divergence(run.tokens[0], reference.tokens[0]),
            })
    return rows


def decile_rows(runs: list[Run]) -> list[dict]:
    """Median step latency (ms) in each tenth of the generation, per method."""
    rows = []
    for run in runs:
        n = len(run.step_seconds)
        row = {"method": run.method, "batch": run.batch}
        for d in range(10):
            chunk = run.step_seconds[d * n // 10:(d + 1) * n // 10]
            row[f"pos ~{run.prompt_tokens + 3 + (2 * d + 1) * n // 20}"] = round(1000 * statistics.median(chunk), 1)
        rows.append(row)
    return rows


TARGET_BUDGET, TARGET_STEPS = 1024, 7000  # issue 6's targets: B = 1024 over a generation of ~8,000 tokens


def twins_for_targets(methods: list[str], steps: int, batch: int, interleave: bool) -> tuple[str, ...]:
    """The methods :func:`run_methods` should twin so that :func:`targets` can time the flatness in the same cycles."""
    wanted = f"B={TARGET_BUDGET}"
    return (wanted,) if wanted in methods and steps >= TARGET_STEPS and batch == 1 and interleave else ()


def targets(runs: list[Run], budget: int = TARGET_BUDGET, divide_length: int = DIVIDE_LENGTH) -> list[dict]:
    """Issue 6's targets that the runs allow: the 8K ones need ``sdpa`` and ``B=budget`` over >= 7,000 steps, the
    short-generation one needs ``compiled`` and ``B=budget``."""
    by = {r.method: r for r in runs}
    full, opt, comp = by.get("sdpa"), by.get(f"B={budget}"), by.get("compiled")
    if opt is None:
        return []
    rows = []
    steps = len(opt.step_seconds)
    if full is not None and steps >= TARGET_STEPS:
        end = opt.prompt_tokens + 3 + steps
        rows += [
            ("step latency at ~8K: B=1024 / sdpa", opt.latency_at(end) / full.latency_at(end), "<= 0.35"),
            *_flatness(opt, end),
            ("tok/s over the generation: B=1024 / sdpa",
             opt.tokens_per_second(steps) / full.tokens_per_second(steps), ">= 2.0"),
            ("peak KV bytes: B=1024 / sdpa", opt.peak_kv_bytes / full.peak_kv_bytes,
             f"<= {1.02 * (budget + divide_length) / 8000:.4f}"),
            ("scoring + compaction share of decode time", opt.compaction_share(steps), "<= 0.03"),
            ("recompiles after warm-up (B=1024)", opt.recompiles_after_warmup, "== 0"),
        ]
    if comp is not None:
        fits = min(budget + divide_length - opt.prompt_tokens - 4, steps)
        rows.append((f"short generation ({fits} tokens, fits): B=1024 / compiled step time",
                     sum(opt.step_seconds[:fits]) / sum(comp.step_seconds[:fits]), "<= 1.05"))
    out = []
    for name, value, goal in rows:
        if not goal:
            out.append({"target": name, "measured": round(float(value), 4), "goal": "", "met": ""})
            continue
        op, bound = goal.split()
        ok = {"<=": value <= float(bound), ">=": value >= float(bound), "==": value == float(bound)}[op]
        out.append({"target": name, "measured": round(float(value), 4), "goal": goal, "met": "yes" if ok else "NO"})
    return out


def _flatness(opt: Run, end: int) -> list[tuple]:
    """The flatness target: the step at the end over the step at position ~1,200. Timed in the same cycles when the
    run has a twin (:func:`run_methods`); the same ratio within the one generation (drift included) is then shown
    beside it, without a goal."""
    same_generation = opt.latency_at(end) / opt.latency_at(1200)
    if not opt.twin_step_seconds:
        return [("step latency at ~8K / at ~1200 (B=1024)", same_generation, "<= 1.15")]
    twin = statistics.median(opt.twin_step_seconds[-100:])
    return [("step latency at ~8K / at ~1200 (B=1024), timed in the same cycles", opt.latency_at(end) / twin,
             "<= 1.15"),
            ("  the same, ~1200 taken 6,800 steps earlier in the one generation (drift included)", same_generation,
             "")]


def plot_latency(runs: list[Run], path: Path) -> None:
    """PNG: step latency vs absolute position, one line per method (100-step rolling median)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        lat = torch.tensor(run.step_seconds) * 1000
        window = min(100, len(lat))
        smooth = lat.unfold(0, window, max(1, window // 4)).median(-1).values
        pos = run.prompt_tokens + 3 + torch.arange(len(smooth)) * max(1, window // 4) + window
        ax.plot(pos, smooth, label=f"{run.method} (batch {run.batch})")
    ax.set_xlabel("position (tokens in context)")
    ax.set_ylabel("decode step latency, ms (rolling median)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(runs: list[Run], lengths: list[int], out: Path, command: str, dtype: str = "float32",
                 interleaved: bool = True) -> dict:
    """Markdown tables, the latency plot and the raw JSON under ``out``; returns the JSON-able summary."""
    from tabulate import tabulate

    out.mkdir(parents=True, exist_ok=True)
    tag = f"batch{runs[0].batch}"
    schedule = ("methods interleaved, one decode step each in turn (peak RSS is the process's)" if interleaved
                else "methods one after the other (peak RSS per method)")
    summary = {"command": command, "machine": machine(), "dtype": dtype, "schedule": schedule,
               "summary": summary_rows(runs, lengths),
               "deciles": decile_rows(runs), "targets": targets(runs) if runs[0].batch == 1 else []}
    table = lambda rows: tabulate(rows, headers="keys", tablefmt="github")
    md = [f"# Decode benchmark, batch {runs[0].batch}", "", f"Command: `{command}`", "",
          f"Machine: {summary['machine']}; weights and KV in {dtype}; {schedule}", "",
          "## Throughput and memory", "", table(summary["summary"]), "",
          "## Step latency (ms, median per tenth of the generation)", "", table(summary["deciles"]), ""]
    if summary["targets"]:
        md += ["## Targets (issue 6)", "", table(summary["targets"]), ""]
    (out / f"{tag}.md").write_text("\n".join(md))
    (out / f"{tag}.json").write_text(json.dumps({**summary, "runs": [asdict(r) | {"tokens": None} for r in runs]}))
    plot_latency(runs, out / f"{tag}-latency.png")
    summary["markdown"] = "\n".join(md)
    return summary


def _replicate(cache, batch: int) -> None:
    """Give every sequence of a ``batch`` the same cached context (decode cost does not depend on the content)."""
    if hasattr(cache, "repeat_rows"):
        cache.repeat_rows(batch)
        return
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)


@torch.no_grad()
def _feed(model, context: torch.Tensor, cache=None, chunk: int = 1024):
    """The cache after feeding ``context`` ``[1, N]`` to ``model`` in chunks. An optimized model gets at most the
    free slots per call, so it compacts as in a generation of N tokens (its first call creates its cache)."""
    import triattn_compile as tc

    state = tc.inspect(model) if tc.is_optimized(model) else None
    fed, keyword = 0, cache_keyword(model.forward)
    while fed < context.shape[1]:
        if state is not None:
            chunk = state.capacity - (cache.occupancy()[0] if cache is not None else 0)
        cache = returned_cache(model(input_ids=context[:, fed:fed + chunk], **{keyword: cache}, use_cache=True))
        fed += chunk
    return cache


@torch.no_grad()
def _steady_decode(forward, cache, token: torch.Tensor, steps: int) -> tuple[float, int]:
    """Seconds per decode step over ``steps`` steps after two warm-up steps (tokens/s = batch / that), and the
    graphs compiled during those steps (a recompile there inflates the figure)."""
    sync = torch.cuda.synchronize if token.is_cuda else (lambda: None)
    keyword = cache_keyword(forward)
    for _ in range(2):
        token = forward(input_ids=token, **{keyword: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    graphs = _graphs()
    start = time.perf_counter()
    for _ in range(steps):
        token = forward(input_ids=token, **{keyword: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    return (time.perf_counter() - start) / steps, _graphs() - graphs


def step_seconds_after(model, context: torch.Tensor, batch: int, method: str,
                       steps: int = 128, divide_length: int = DIVIDE_LENGTH) -> tuple[float, int]:
    """Seconds per decode step, and graphs compiled while timing, of ``method`` (``sdpa``, ``compiled`` or
    ``B=<budget>``) for ``batch`` sequences that each hold the context ``[1, N]``: the state at position N of a long
    generation, without decoding N steps. The default 128 steps span one compaction round of an optimized model
    (one per ``divide_length`` steps, 128 by default)."""
    from transformers import DynamicCache

    import triattn_compile as tc

    token = context[:, -1:].expand(batch, 1)
    if method in ("sdpa", "compiled"):
        cache = _feed(model, context, DynamicCache(config=model.config))
        _replicate(cache, batch)
        forward = model.forward if method == "sdpa" else torch.compile(model.forward)
        try:
            return _steady_decode(forward, cache, token, steps)
        finally:
            torch._dynamo.reset()
    budget = _budget(method)
    optimized = tc.optimize(_replica(model), budget=budget, protect_prompt=False, divide_length=divide_length)
    try:
        cache = _feed(optimized, context)
        _replicate(cache, batch)
        torch._dynamo.reset()  # the decode graph is compiled for the batch's shapes, not generalised from the feed's
        return _steady_decode(optimized.forward, cache, token, steps)
    finally:
        torch._dynamo.reset()


def _budget(method: str) -> int:
    if not (method.startswith("B=") and method[2:].isdigit()):
        raise ValueError(f"unknown method {method!r}: use sdpa, compiled or B=<budget>")
    return int(method[2:])


def context_latency(model, context: torch.Tensor, batches: list[int], methods: list[str],
                    steps: int = 128, divide_length: int = DIVIDE_LENGTH) -> Iterator[dict]:
    """Per-step decode latency of every method at each batch size after a context of ``[1, N]`` tokens per
    sequence (:func:`step_seconds_after`): long contexts at batch sizes whose whole generation is too slow to run.
    Yields one row per (batch, method) as soon as it is measured."""
    for batch in batches:
        first = None
        for method in methods:
            seconds, recompiles = step_seconds_after(model, context, batch, method, steps, divide_length)
            first = first or seconds
            yield {"method": method, "batch": batch, "context": context.shape[1],
                   "ms/step": round(1000 * seconds, 1), "tok/s": round(batch / seconds, 1),
                   f"step vs {methods[0]}": round(seconds / first, 3), "recompiles": recompiles}


def serving(model, context: torch.Tensor, cap_bytes: int, budgets: list[int], steps: int = 128,
            divide_length: int = DIVIDE_LENGTH) -> Iterator[dict]:
    """Table-4-style run: under a KV-memory cap, the largest batch each method fits at the end of a generation of
    ``context`` tokens (``[1, N]``), and its decode throughput there (full attention holds N tokens per sequence;
    TriAttention holds budget + ``divide_length`` slots and compacts once per ``divide_length`` steps, as in a long
    generation). Yields one row per method as soon as it is measured, full attention first."""
    cfg = model.config.get_text_config()
    elsize = next(model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elsize
    methods = [("sdpa", per_slot * context.shape[1])]
    methods += [(f"B={budget}",
                 (per_slot + 8 * cfg.num_hidden_layers * cfg.num_key_value_heads) * (budget + divide_length))
                for budget in budgets]  # + slot_pos
    base = None
    for method, per_seq in methods:
        batch = cap_bytes // per_seq
        if batch < 1 and method == "sdpa":
            continue  # full attention does not fit one sequence: the ratio column stays empty
        step, recompiles = step_seconds_after(model, context, batch, method, steps, divide_length)
        if method == "sdpa":
            base = batch / step
        yield {"method": method, "KV per sequence MiB": round(per_seq / 2**20, 1), "max batch": batch,
               "tok/s": round(batch / step, 1), "recompiles": recompiles,
               "tok/s vs sdpa": round(batch / step / base, 2) if base else None}
