"""Run one vLLM engine in its own process and write what it did as JSON (the tests start engines through this, one
at a time, so that each is shut down with its process).

    python tests_vllm/engine.py MODEL OUT.json [--triattn JSON] [--max-tokens N] [--max-model-len N]
        [--prompt TEXT ...] [--repeat-prompt K] [--kv-blocks N] [--no-hybrid] [--overflow K T]

OUT.json: ``{"outputs": [[token ids] per prompt], "logprobs": [[their logprobs] per prompt] (``--logprobs``),
"reports": [triattn_compile.vllm.worker.report per worker] or None (TriAttention off), "backend": the compile backend
vLLM was configured with, "pool": the block pool's free blocks before and after the run, the most blocks any request
held (in the compacted KV cache groups; and per group), and the scheduler's freed-block count}``.
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
    parser.add_argument("--kv-blocks", type=int, default=None, help="pool size in blocks (num_gpu_blocks_override)")
    parser.add_argument("--logprobs", action="store_true", help="also record each generated token's logprob")
    parser.add_argument("--no-hybrid", action="store_true", help="disable vLLM's hybrid KV cache manager")
    parser.add_argument("--overflow", type=int, nargs=2, default=None, metavar=("K", "T"),
                        help="then K copies of the first prompt generating T tokens each, all at once")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"triattn": json.loads(args.triattn)}} if args.triattn is not None else {}
    llm = LLM(args.model, dtype="float32", max_model_len=args.max_model_len, seed=0,
              num_gpu_blocks_override=args.kv_blocks, **extra,
              **({"disable_hybrid_kv_cache_manager": True} if args.no_hybrid else {}))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    held = {"max": 0, "running": 0, "preemptions": 0, "groups": [0] * len(managers)}
    original, preempt = scheduler.schedule, scheduler._preempt_request

    def preempt_counted(*a, **k):
        held["preemptions"] += 1
        return preempt(*a, **k)

    def schedule(*a, **k):
        out = original(*a, **k)
        held["running"] = max(held["running"], len(scheduler.running))
        for request in scheduler.running:
            for g, manager in enumerate(managers):
                blocks = manager.req_to_blocks[request.request_id]
                held["groups"][g] = max(held["groups"][g], sum(not b.is_null for b in blocks))
        compacted = [g for g, m in enumerate(managers) if type(m.kv_cache_spec).__name__ != "SlidingWindowSpec"]
        held["max"] = max((held["groups"][g] for g in compacted), default=0)
        return out

    scheduler.schedule, scheduler._preempt_request = schedule, preempt_counted
    free_before = pool.get_num_free_blocks()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=0 if args.logprobs else None)
    prompts = [" ".join([p] * args.repeat_prompt) for p in (args.prompt or PROMPTS)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    free_after = pool.get_num_free_blocks()  # after the main prompts (then: the refused one, the overflow)
    refused = None
    if args.long_prompt:  # a prompt of that many tokens, expected to be refused (budget smaller)
        from vllm.exceptions import VLLMValidationError

        try:
            llm.generate({"prompt_token_ids": [100] * args.long_prompt}, params, use_tqdm=False)
        except (ValueError, VLLMValidationError) as exc:
            refused = {"error": type(exc).__name__, "message": str(exc)}
    overflow = None
    if args.overflow:  # more requests than the pool holds at their peak: admitted as blocks allow, never preempted
        count, tokens = args.overflow
        more = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        overflow = [list(o.outputs[0].token_ids) for o in llm.generate([prompts[0]] * count, more, use_tqdm=False)]
    reports = llm.collective_rpc("triattn_report") if extra else None  # the plugin's worker extension (plugin.py)
    backend = llm.llm_engine.vllm_config.compilation_config.backend
    logprobs = ([[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                 for o in outputs] if args.logprobs else None)
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outputs], "logprobs": logprobs,
              "prompt_lengths": [len(o.prompt_token_ids) for o in outputs],
              "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs], "reports": reports, "backend": backend,
              "refused": refused, "overflow": overflow,
              "pool": {"free_before": free_before, "free_after": free_after, "free_at_end": pool.get_num_free_blocks(),
                       "max_blocks_held": held["max"], "max_blocks_held_by_group": held["groups"],
                       "group_kinds": [type(m.kv_cache_spec).__name__ for m in managers],
                       "freed": getattr(scheduler, "triattn_freed_blocks", None),
                       "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
                       "max_running": held["running"], "preemptions": held["preemptions"],
                       "max_active": scheduler.max_num_active_reqs}}
    with open(args.out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
