"""Run one vLLM engine in its own process and write what it did as JSON (the tests start engines through this, one
at a time, so that each is shut down with its process).

    python tests_vllm/engine.py MODEL OUT.json [--triattn JSON] [--max-tokens N] [--prompt TEXT ...]

OUT.json: ``{"outputs": [[token ids] per prompt], "reports": [triattn_compile.vllm.worker.report per worker] or None
(TriAttention off), "backend": the compile backend vLLM was configured with}``.
"""

from __future__ import annotations

import argparse
import json
import os

PROMPTS = ["The quick brown fox", "In 1905, a patent clerk in Bern", "def fibonacci(n):"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--triattn", default=None, help="the additional_config['triattn'] object, as JSON")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"triattn": json.loads(args.triattn)}} if args.triattn is not None else {}
    llm = LLM(args.model, dtype="float32", max_model_len=512, seed=0, **extra)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(args.prompt or PROMPTS, params, use_tqdm=False)
    reports = llm.collective_rpc("triattn_report") if extra else None  # the plugin's worker extension (plugin.py)
    backend = llm.llm_engine.vllm_config.compilation_config.backend
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outputs], "reports": reports, "backend": backend}
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
