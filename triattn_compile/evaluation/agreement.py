"""Agreement with full attention: a greedy continuation by the full model, and how much of it a compressed model
predicts identically.

Under teacher forcing on the full model's continuation, a compressed model's free greedy generation is identical
up to its first wrong top-1 prediction (it is fed exactly the same tokens until then, and the chunked schedule
compacts at the same token counts as a token-by-token decode), so the first divergence is read off the
teacher-forced predictions. :func:`free_greedy_divergence` checks that on one run.
"""

from __future__ import annotations

import torch

from triattn_compile.cache import cache_keyword
from triattn_compile.evaluation.nll import Forced


@torch.no_grad()
def greedy_continuation(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Full-attention greedy continuation ``[new_tokens]`` of ``prompt`` ``[P]`` (no EOS stop)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keyword = cache_keyword(model.forward)
    out = model(input_ids=prompt[None], **{keyword: cache}, use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        nxt = out.logits[0, -1].argmax()
        tokens.append(nxt)
        out = model(input_ids=nxt.view(1, 1), **{keyword: cache}, use_cache=True)
    return torch.stack(tokens)


def continuation_agreement(forced: Forced, prompt_len: int) -> dict:
    """``agreement``: fraction of continuation tokens whose teacher-forced top-1 prediction is the token itself;
    ``first_divergence``: index (0-based, in the continuation) of the first miss, or its length if none."""
    target_start = prompt_len - 1  # pred[t - 1] predicts ids[t]; the continuation starts at ids[prompt_len]
    hits = forced.pred[target_start:] == forced.target[target_start:]
    miss = (~hits).nonzero()
    return {"agreement": hits.double().mean().item(),
            "first_divergence": int(miss[0]) if miss.numel() else int(hits.numel())}


@torch.no_grad()
def free_greedy_divergence(model, ids: torch.Tensor, prompt_len: int, limit: int) -> int:
    """First index where a compressed model's own greedy generation leaves ``ids[prompt_len:]`` (or ``limit``).

    Feeds the prompt in cache-sized chunks, then one generated token per call (slow: used as a check).
    """
    import triattn_compile as tc

    state = tc.inspect(model)
    cache, pos = None, 0
    while pos < prompt_len:
        free = state.capacity - (cache.occupied if cache is not None else 0)
        step = min(state.config.divide_length, free, prompt_len - pos)
        out = model(input_ids=ids[pos : pos + step][None], **({"past_key_values": cache} if cache is not None else {}))
        cache, pos = tc.current_cache(model), pos + step
    for i in range(limit):
        nxt = out.logits[0, -1].argmax()
        if prompt_len + i >= ids.numel() or nxt != ids[prompt_len + i]:
            return i
        out = model(input_ids=nxt.view(1, 1), past_key_values=cache)
    return limit
