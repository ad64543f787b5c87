"""Which RoPE decoder families run through the TriAttention vLLM plugin end to end, on tiny random checkpoints.

    .venv-vllm/bin/python bench/vllm_families.py [--families llama gptj ...] [--out bench/results/vllm-families]
        [--tokens 400] [--eager] [--hf-python .venv/bin/python] [--work DIR]

Run it with the vLLM venv's python. Per family: a random 2-layer checkpoint with SmolLM2's tokenizer
(``tests_vllm/checkpoints.py``), ``triattn calibrate`` in the main venv (``--hf-python``), then one engine in its own
process (``tests_vllm/engine.py``: B = 128, divide_length 128, its 3 default prompts x ``--tokens`` greedy tokens).
OK: the engine exits 0, does as many compactions as :meth:`PagedSchedule.compacts_at` gives for those lengths, and
the pool's free blocks after equal those before. ``--eager`` sets ``VLLM_CPU_CI_ENV=1`` (Dynamo eager, no Inductor).
Writes ``<out>/summary.md`` and ``summary.json``; logs go to ``--work`` (a temp dir by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests_vllm"))

from checkpoints import save_tiny, smollm2_tokenizer  # noqa: E402

BUDGET = DIVIDE = 128
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
MHA = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=2048)
GPTJ = dict(n_embd=256, n_layer=2, n_head=4, n_positions=2048, tie_word_embeddings=False)
WINDOWED = ["sliding_attention", "full_attention"]


def rope(factor: float = 1.0) -> dict:
    """``rope_parameters`` with the given ``partial_rotary_factor``."""
    return {"rope_parameters": {**ROPE, **({"partial_rotary_factor": factor} if factor != 1.0 else {})}}


# family -> (config class, model class, config kwargs); COMMON shapes unless the family's own keys are given
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, **rope()}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, **rope(), "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, **rope(), "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, **rope(), "use_sliding_window": False}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, **rope(), "sliding_window": None}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, **rope()}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, **rope(), "sliding_window": 4096}),
    "gemma2_w64": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, **rope(), "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "sliding_window": 4096}),
    "gemma3_w64": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "sliding_window": 64, "layer_types": WINDOWED}),
    "gptneox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**MHA, "intermediate_size": 512, **rope(0.25),
                                                        "tie_word_embeddings": False}),
    "phi": ("PhiConfig", "PhiForCausalLM", {**COMMON, **rope(0.5)}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**COMMON, **rope(0.25)}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {**COMMON, **rope()}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**COMMON, **rope()}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {**COMMON, **rope(), "sliding_window": 4096,
                                                  "layer_types": WINDOWED}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {**COMMON, **rope(), "attention_multiplier": 0.125}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {**COMMON, **rope(), "sliding_window": None}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**GPTJ, "rotary_dim": 64}),
    "gptj_partial": ("GPTJConfig", "GPTJForCausalLM", {**GPTJ, "rotary_dim": 32}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**COMMON, **rope(), "use_qk_norm": False}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {**COMMON, **rope(), "sliding_window": 4096,
                                                        "layer_types": WINDOWED}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {**COMMON, **rope(), "sliding_window": None,
                                                        "layer_types": ["full_attention"] * 2}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {**MHA, "num_kv_heads": 2, "new_decoder_architecture": True,
                                                     "alibi": False, "bias": False, "parallel_attn": True, **rope(),
                                                     "tie_word_embeddings": True}),
    "glm": ("GlmConfig", "GlmForCausalLM", {**COMMON, **rope(0.5)}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {**COMMON, **rope(0.5)}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {**COMMON, **rope(0.5)}),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", {**COMMON, **rope()}),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", {**COMMON, **rope()}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {**COMMON, **rope(), "no_rope_layers": [1, 1],
                                                        "use_sliding_window": False}),
}

ERROR = re.compile(r"^([\w.]*(Error|Exception|Failure|Failed|NotFound|Mismatch): .*|triattn \w+: error: .*)$")
LOG_PREFIX = re.compile(r"^(\[rank\d+\]:\s*|\(EngineCore\S*\s+pid=\d+\)\s*)?((ERROR|WARNING|INFO) \S+ \S+ \[\S+\]\s*)?")


def last_error(text: str) -> str:
    """The last line that names an exception (or the CLI's one-line error), else the last non-empty line."""
    lines = [LOG_PREFIX.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    hit = next((line for line in reversed(lines) if ERROR.match(line)), lines[-1] if lines else "")
    return hit[:300]


def sh(cmd: list[str], log: Path, env: dict[str, str], timeout: int = 900) -> tuple[int, str]:
    """Run ``cmd`` under ``nice`` from the repo root, output to ``log``: ``(exit status, output)``; 124 on timeout."""
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(["nice", "-n", "10", *cmd], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log.read_text(errors="replace")


def expected_compactions(prompt_lengths: list[int], tokens: int, block_size: int) -> int:
    """Compactions the schedule does for requests of these prompt lengths generating ``tokens`` each."""
    from triattn_compile.vllm.paged import PagedSchedule

    schedule = PagedSchedule(BUDGET, DIVIDE, block_size)
    return sum(sum(schedule.compacts_at(p) for p in range(n + tokens - 1)) for n in prompt_lengths)


def run_family(family: str, args: argparse.Namespace, pad_token_id: int) -> dict:
    """Build, calibrate and run one family; the row of the summary."""
    import transformers

    config_name, model_name, kwargs = FAMILIES[family]
    kwargs = copy.deepcopy(kwargs)  # transformers rewrites rope_parameters in place (per layer type)
    row = {"family": family, "config": config_name, "rotary": None, "result": "FAIL", "step": None, "error": "",
           "compactions": None, "expected": None, "free_before": None, "free_after": None, "seconds": {}}
    folder, stats, out = args.work / family, args.work / f"{family}.safetensors", args.work / f"{family}.json"
    start = time.time()
    try:
        save_tiny(folder, getattr(transformers, config_name), getattr(transformers, model_name),
                  pad_token_id=pad_token_id, **kwargs)
    except Exception as exc:  # a config this transformers refuses: the row says why
        return {**row, "step": "build", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    row["seconds"]["build"] = round(time.time() - start, 1)

    start = time.time()
    rc, text = sh([args.hf_python, "-m", "triattn_compile", "calibrate", "--model", str(folder), "--text",
                   str(REPO / "README.md"), "--tokens", "600", "--out", str(stats), "--json"],
                  args.work / f"{family}.calibrate.log", {"HF_HUB_OFFLINE": "1"})
    row["seconds"]["calibrate"] = round(time.time() - start, 1)
    if rc != 0:
        return {**row, "step": "calibrate", "error": last_error(text)}

    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"VLLM_CPU_CI_ENV": "1"} if args.eager else {})}
    triattn = {"budget": BUDGET, "divide_length": DIVIDE, "stats": str(stats)}
    out.unlink(missing_ok=True)
    start = time.time()
    rc, text = sh([sys.executable, str(REPO / "tests_vllm/engine.py"), str(folder), str(out), "--triattn",
                   json.dumps(triattn), "--max-tokens", str(args.tokens), "--max-model-len", str(args.tokens + 512)],
                  args.work / f"{family}.engine.log", env)
    row["seconds"]["engine"] = round(time.time() - start, 1)
    found = re.search(r"TriAttention: (.*?)(; statistics .*)?$", text, re.MULTILINE)
    row["rotary"] = found.group(1) if found else None
    if rc != 0 or not out.is_file():
        return {**row, "step": "engine", "error": last_error(text)}
    data = json.loads(out.read_text())
    report, pool = data["reports"][0], data["pool"]
    row.update(rotary=(report.get("layout") or {}).get("describe", row["rotary"]),
               compactions=sum(c["compactions"] for c in report["compaction"]),
               expected=expected_compactions(data["prompt_lengths"], args.tokens, pool["block_size"]),
               free_before=pool["free_before"], free_after=pool["free_after"])
    problems = []
    if row["compactions"] != row["expected"]:
        problems.append(f"{row['compactions']} compactions, expected {row['expected']}")
    if pool["free_after"] != pool["free_before"]:
        problems.append(f"free blocks {pool['free_before']} -> {pool['free_after']}")
    return {**row, "result": "FAIL" if problems else "OK", "step": "engine" if problems else None,
            "error": "; ".join(problems)}


def git_state() -> str:
    """The checked-out commit, ``-dirty`` with uncommitted changes."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def write_summary(rows: list[dict], args: argparse.Namespace, command: str, wall: float) -> None:
    """``summary.json`` (everything) and ``summary.md`` (the table) in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "wall_seconds": round(wall), "tokens": args.tokens, "budget": BUDGET,
            "divide_length": DIVIDE, "eager": args.eager, "logs": str(args.work), "code": git_state()}
    (args.out / "summary.json").write_text(json.dumps({**meta, "families": rows}, indent=1) + "\n")
    cell = lambda v: "-" if v in (None, "") else str(v).replace("|", "/")
    table = [f"| {r['family']} | {r['config']} | {cell(r['rotary'])} | {r['result']} | {cell(r['step'])} | "
             f"{cell(r['error'])} | {cell(r['compactions'])} / {cell(r['expected'])} | "
             f"{cell(r['free_before'])} -> {cell(r['free_after'])} |" for r in rows]
    ok = sum(r["result"] == "OK" for r in rows)
    mode = ("`--eager`: `VLLM_CPU_CI_ENV=1`, engines compiled with Dynamo's eager backend, not Inductor"
            if args.eager else "engines compiled with vLLM's CPU default (Inductor)")
    text = (f"# TriAttention vLLM plugin: RoPE decoder families\n\n```\n{command}\n```\n\n"
            f"{ok} of {len(rows)} OK in {wall / 60:.0f} min (code: `{meta['code']}`). B = {BUDGET}, "
            f"divide_length {DIVIDE}, engine.py's 3 default prompts x {args.tokens} tokens; {mode}. Random 2-layer "
            "checkpoints (transformers of the vLLM venv), calibrated with the main venv's `triattn calibrate` "
            "(600 tokens of README.md). OK: exit 0, compactions == the schedule's count "
            "(`PagedSchedule.compacts_at`), free blocks after == before.\n\n"
            "| family | config class | rotary form (discovery) | result | failed step | error | compactions / "
            "expected | free blocks before -> after |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(table) + "\n")
    (args.out / "summary.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/vllm-families")
    parser.add_argument("--tokens", type=int, default=400, help="tokens generated per prompt")
    parser.add_argument("--eager", action="store_true", help="VLLM_CPU_CI_ENV=1: no Inductor (faster start)")
    parser.add_argument("--hf-python", default=os.environ.get("TRIATTN_HF_PYTHON", str(REPO / ".venv/bin/python")),
                        help="the main venv's python, which runs `triattn calibrate`")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints, statistics and logs (default: temp)")
    args = parser.parse_args()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="vllm-families-"))
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).relative_to(REPO).as_posix() if sys.executable.startswith(str(REPO))
                          else sys.executable, *sys.argv])
    print(f"logs: {args.work}", flush=True)
    pad_token_id = smollm2_tokenizer().pad_token_id  # some configs' default pad ids lie outside its vocabulary
    rows, start = [], time.time()
    for family in args.families:
        rows.append(run_family(family, args, pad_token_id))
        r = rows[-1]
        print(f"[{family}] {r['result']} step={r['step']} {r['error'][:160]} {r['seconds']}", flush=True)
        write_summary(rows, args, command, time.time() - start)


if __name__ == "__main__":
    main()
