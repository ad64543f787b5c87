"""Run one vLLM engine in its own process and write what it did as JSON (the tests start engines through this, one
at a time, so that each is shut down with its process).

    python tests_vllm/engine.py MODEL OUT.json [--triattn JSON] [--max-tokens N] [--max-model-len N]
        [--prompt TEXT ...] [--repeat-prompt K]

OUT.json: ``{"outputs": [[token ids] per prompt], "reports": [triattn_compile.vllm.worker.report per worker] or None
(TriAttention off), "backend": the compile backend vLLM was configured with, "pool": the block pool's free blocks
before and after the run, the most blocks any request held, and the scheduler's freed-block count}``.
The pool is read from vLLM's own scheduler, which runs in the engine-core process: the engine is started in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that it can be read; a step hook records each request's block count.
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
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--long-prompt", type=int, default=0, help="then try a prompt of N tokens (refused?)")
    parser.add_argument("--repeat-prompt", type=int, default=1, help="each prompt's text repeated K times")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"triattn": json.loads(args.triattn)}} if args.triattn is not None else {}
    llm = LLM(args.model, dtype="float32", max_model_len=args.max_model_len, seed=0, **extra)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    held = {"max": 0}
    original = scheduler.schedule

    def schedule(*a, **k):
        out = original(*a, **k)
        for request in scheduler.running:
            blocks = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[request.request_id]
            held["max"] = max(held["max"], sum(not b.is_null for b in blocks))
        return out

    scheduler.schedule = schedule
    free_before = pool.get_num_free_blocks()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [" ".join([p] * args.repeat_prompt) for p in (args.prompt or PROMPTS)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    free_after = pool.get_num_free_blocks()
    refused = None
    if args.long_prompt:  # a prompt of that many tokens, expected to be refused (budget smaller)
        try:
            llm.generate({"prompt_token_ids": [100] * args.long_prompt}, params, use_tqdm=False)
        except ValueError as exc:
            refused = str(exc)
    reports = llm.collective_rpc("triattn_report") if extra else None  # the plugin's worker extension (plugin.py)
    backend = llm.llm_engine.vllm_config.compilation_config.backend
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outputs],
              "prompt_lengths": [len(o.prompt_token_ids) for o in outputs], "reports": reports, "backend": backend,
              "refused": refused, "pool": {"free_before": free_before, "free_after": free_after,
                       "max_blocks_held": held["max"], "freed": getattr(scheduler, "triattn_freed_blocks", None),
                       "block_size": llm.llm_engine.vllm_config.cache_config.block_size}}
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
