"""Copy heads: the KV heads that look a token's earlier occurrence up (echo, or duplicate-token, heads) or the token
after it (induction heads), measured on random tokens, no data (RazorAttention, Tang et al. 2024, keeps full caches
for the same two kinds). On SmolLM2-135M they are the heads that recall the retrieval probe's facts
(``results/quality-heads/``); ``triattention-copy`` gives their layers a larger budget.
"""

from __future__ import annotations

import torch
from torch import nn

ECHO, INDUCTION = range(2)


@torch.no_grad()
def copy_scores(model: nn.Module, length: int = 256, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """``[2, L, Hkv]``: per layer and KV head, the mean attention probability a query in the second copy of a random
    token sequence repeated once pays to its token's first occurrence (echo) and to the token after it (induction),
    max over the KV head's query heads. Needs a transformers model (eager attention returns the probabilities)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "set_attn_implementation") or config is None:
        raise ValueError(f"copy scores need a transformers model (eager attention with output_attentions); "
                         f"{type(model).__name__} is not one: give the layers' budgets as layer_budgets= instead")
    vocab, kv = config.vocab_size, config.num_key_value_heads
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(vocab // 100, vocab - vocab // 100, (rows, length), generator=gen).to(device)
    previous = config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    try:
        attentions = model(torch.cat([seq, seq], 1), output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    query = torch.arange(length + 1, 2 * length, device=device)
    out = []
    for shift in (length, length - 1):  # echo: the same token; induction: the token after it
        per_layer = [a[:, :, query, query - shift].float().mean((0, 2)) for a in attentions]  # [H] each
        out.append(torch.stack(per_layer).view(len(attentions), kv, -1).amax(-1))
    return torch.stack(out).cpu()


def copy_layers(scores: torch.Tensor, threshold: float = 0.05) -> list[int]:
    """The layers with a copy head: a KV head whose echo or induction score (:func:`copy_scores`) is at least
    ``threshold``."""
    return (scores.amax(0) >= threshold).any(-1).nonzero().flatten().tolist()


def boosted_budgets(budget: int, layers: int, boosted: list[int], boost: float, floor: int) -> tuple[int, ...] | None:
    """Per-layer budgets of mean (at most) ``budget``: ``boost * budget`` in the ``boosted`` layers, the rest shared
    evenly by the others, none below ``floor`` (the boost shrinks to fit); ``None`` when nothing is boosted."""
    n = len(boosted)
    if n in (0, layers):
        return None
    high = int(boost * budget)
    low = (layers * budget - n * high) // (layers - n)
    if low < floor:
        low = floor
        high = (layers * budget - (layers - n) * low) // n
    if high <= low:
        return None
    return tuple(high if i in boosted else low for i in range(layers))
