"""Which heads recall the probe's facts: copy heads (echo and induction), and what giving them R-KV's choice costs.

    python bench/copy_heads.py scores                        # the copy score of every (layer, KV head)
    python bench/copy_heads.py eval TRIATTN-EVAL-ARGS        # `triattn eval`, with the diagnostic policy below

A diagnostic, not a policy of the library. ``scores``: on ``rows`` random token sequences of ``length`` tokens,
each repeated once, eager attention; per query head, the mean probability that a query in the repeat pays to its
token's first occurrence (an echo, or duplicate-token, head) and to the token after it (an induction head), each
max over the GQA group (RazorAttention, Tang et al. 2024, keeps full caches for the same two kinds).

``eval`` runs ``triattn eval`` with one more policy, ``copy-heads``: ``triattention-lasting`` in every head except
those chosen by ``threshold`` (a score at least that: ``kind`` 0 either, 1 echo, 2 induction) or by the layer band
``[lo, hi)`` (``threshold`` < 0), whose slots R-KV ranks: with its own 8 newest kept (``window=0``) or after
lasting's protected newest (``window=1``, the split of ``triattention-reserve``). Results and commands:
``results/quality-heads/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from triattn_compile.loading import load_model
from triattn_compile.policies import POLICIES, RKV, CompactionInputs, TriAttentionLasting, rkv_ranking


@torch.no_grad()
def copy_scores(model, length: int = 256, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """``[2, L, Hkv]``: echo and induction scores (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    seq = torch.randint(vocab // 100, vocab - vocab // 100, (rows, length), generator=gen)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    try:
        attentions = model(torch.cat([seq, seq], 1), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    query = torch.arange(length + 1, 2 * length)
    kv = model.config.num_key_value_heads
    out = []
    for shift in (length, length - 1):  # echo: the same token; induction: the token after it
        per_layer = [a[:, :, query, query - shift].float().mean((0, 2)) for a in attentions]  # [H] each
        out.append(torch.stack(per_layer).view(len(attentions), kv, -1).amax(-1))
    return torch.stack(out)


SCORES: torch.Tensor | None = None  # set by ``eval`` before the policy runs


@dataclass
class CopyHeads(TriAttentionLasting):
    """``triattention-lasting``, with the chosen heads ranked by R-KV (module docstring)."""

    threshold: float = 0.05
    kind: int = 0  # which score the threshold reads: 0 either, 1 echo, 2 induction
    lo: int = 0
    hi: int = 0
    window: int = 0
    query_window: int = 8
    name: str = "copy-heads"

    def chosen(self, layers: int) -> torch.Tensor:
        """``[L, Hkv]`` bool."""
        if self.threshold >= 0:
            return (SCORES.amax(0) if self.kind == 0 else SCORES[self.kind - 1]) >= self.threshold
        layer = torch.arange(layers)[:, None]
        return ((layer >= self.lo) & (layer < self.hi)).expand(layers, SCORES.shape[-1])

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        lasting = super().scores(inputs)  # [L, B, Hkv, N], the newest protected (+inf)
        if self.window:
            rkv = torch.where(torch.isinf(lasting), lasting, rkv_ranking(inputs, lasting, self.query_window))
        else:
            rkv = RKV(query_window=self.query_window).scores(inputs)  # its newest query_window kept (+inf)
        chosen = self.chosen(lasting.shape[0]).to(lasting.device)[:, None, :, None]
        return torch.where(chosen, rkv, lasting)


def main() -> int:
    global SCORES
    model, _ = load_model()
    SCORES = copy_scores(model)
    if sys.argv[1:2] == ["scores"]:
        torch.set_printoptions(precision=2, linewidth=200, sci_mode=False)
        for kind, table in zip(("echo", "induction"), SCORES):
            print(f"{kind} score, rows = KV heads, columns = layers 0..{table.shape[0] - 1}:\n{table.T}")
        for threshold in (0.05, 0.1):
            print(f"KV heads with a score >= {threshold}: {int((SCORES.amax(0) >= threshold).sum())} of "
                  f"{SCORES[0].numel()}")
        return 0
    del model
    POLICIES[CopyHeads.name] = CopyHeads
    from triattn_compile.cli import main as triattn

    return triattn(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
