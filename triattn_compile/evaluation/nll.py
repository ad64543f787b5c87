"""Teacher forcing in chunks: per-token NLL and top-1 predictions, with compaction between chunks.

A compressed model is fed ``divide_length`` tokens per call (at most what fills the cache), so compaction happens
exactly when a token-by-token decode would compact (the cache holds ``budget + divide_length``); the full model is
fed larger chunks with a ``DynamicCache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from triattn_compile.cache import cache_keyword


@dataclass
class Forced:
    """Per predicted token ``t = 1..N-1``: ``nll[t-1] = -log p(ids[t] | ids[:t])`` and the argmax ``pred[t-1]``."""

    nll: torch.Tensor  # [N - 1] float64
    pred: torch.Tensor  # [N - 1] int64
    target: torch.Tensor  # [N - 1] int64: ids[1:]


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none").double(), logits.argmax(-1)


@torch.no_grad()
def teacher_force(model, ids: torch.Tensor, compressed: bool, chunk: int = 512, progress=None) -> Forced:
    """Run ``model`` over ``ids`` ``[N]`` in chunks and score every next-token prediction.

    Args:
        compressed: ``model`` was optimized: each call feeds at most ``divide_length`` tokens and never more than
            the free slots, and the cache is the one the previous call made. Otherwise a ``DynamicCache`` and
            ``chunk``-token calls.
        progress: optional tqdm bar advanced by the tokens fed.
    """
    from transformers import DynamicCache

    import triattn_compile as tc

    ids = ids.reshape(-1)
    n = ids.numel()
    nll, pred = [], []
    cache = None if compressed else DynamicCache()
    state = tc.inspect(model) if compressed else None
    keyword = cache_keyword(model.forward)
    pos = 0
    while pos < n:
        if compressed:
            free = state.capacity - (cache.occupied if cache is not None else 0)
            step = min(state.config.divide_length, free, n - pos)
        else:
            step = min(chunk, n - pos)
        piece = ids[pos : pos + step][None]
        kwargs = {keyword: cache} if cache is not None else {}
        out = model(input_ids=piece, use_cache=True, **kwargs)
        if compressed:
            cache = tc.current_cache(model)
        logits = out.logits[0]  # [step, V]
        targets = ids[pos + 1 : pos + step + 1]
        a, b = _score(logits[: targets.numel()], targets)
        nll.append(a)
        pred.append(b)
        pos += step
        if progress is not None:
            progress.update(step)
    return Forced(torch.cat(nll), torch.cat(pred), ids[1:].clone())
