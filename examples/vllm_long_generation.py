"""TriAttention inside vLLM: one long greedy generation through the offline ``LLM`` API with the KV cache compressed
(run with the vLLM venv's python; README: vLLM).

    .venv/bin/triattn calibrate --model MODEL_DIR --text notes.txt --out stats.safetensors   # main venv, once
    .venv-vllm/bin/python examples/vllm_long_generation.py MODEL_DIR stats.safetensors [--budget 256] [--tokens 2000]

``MODEL_DIR``: a Hugging Face model folder vLLM can load; ``stats.safetensors``: a ``triattn calibrate`` file of that
model, kept outside its folder. Prints the start of the answer, then what the plugin's worker reports: the layout it
found in vLLM's compiled graph and how many compactions it ran.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hugging Face model folder")
    parser.add_argument("stats", help="a `triattn calibrate` file of that model")
    parser.add_argument("--budget", type=int, default=256, help="tokens kept per KV head (a multiple of 128)")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens to generate")
    parser.add_argument("--prompt", default="Write a long story about a lighthouse keeper who collects clocks.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # 1 GiB of KV cache (vLLM's CPU default claims 92 % of the machine's memory at start-up, and refuses to start
    # where other processes hold some of it)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=args.tokens + 512,
              additional_config={"triattn": {"budget": args.budget, "stats": args.stats}})
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    (out,) = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(out.outputs[0].text[:600], "...\n")
    for worker in llm.collective_rpc("triattn_report"):
        compactions = sum(c["compactions"] for c in worker["compaction"])
        print(f"layout: {worker['layout']['describe']}")
        print(f"{len(out.outputs[0].token_ids)} tokens generated after a {len(out.prompt_token_ids)}-token prompt; "
              f"{compactions} compactions back to {args.budget} tokens per KV head")


if __name__ == "__main__":
    main()
