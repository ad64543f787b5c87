"""Which heads recall the probe's facts: copy heads (echo and induction), what giving them R-KV's choice costs, and
what giving them more of the budget buys.

    python bench/copy_heads.py scores                        # the copy score of every (layer, KV head)
    python bench/copy_heads.py eval TRIATTN-EVAL-ARGS        # `triattn eval`, with the diagnostic policies below
    python bench/copy_heads.py pairs FOLDER BUDGET [OPTIONS] # head-budgets runs: gap closed, paired differences

A diagnostic, not a policy of the library. ``scores``: the library's copy scores
(``triattn_compile/calibration/copy_heads.py``): on random token sequences repeated once, per KV head the mean
probability that a query in the repeat pays to its token's first occurrence (an echo head) and to the token after it
(an induction head). The library's ``triattention-copy`` policy came out of these diagnostics (per-layer budgets,
``results/quality-copy/``).

``eval`` runs ``triattn eval`` with two more policies:

* ``copy-heads``: ``triattention-lasting`` in every head except those chosen by ``threshold`` (a score at least
  that: ``kind`` 0 either, 1 echo, 2 induction) or by the layer band ``[lo, hi)`` (``threshold`` < 0), whose slots
  R-KV ranks: with its own 8 newest kept (``window=0``) or after lasting's protected newest (``window=1``, the split
  of ``triattention-reserve``). Results and commands: ``results/quality-heads/``.
* ``head-budgets`` (:class:`HeadBudgets`): per-head budgets at the same mean, more for the copy heads, emulated by
  masking inside a run whose budget is the largest head's. Results and commands: ``results/quality-budgets/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from triattn_compile.calibration.copy_heads import copy_scores
from triattn_compile.loading import load_model
from triattn_compile.policies import (
    POLICIES,
    RKV,
    CompactionInputs,
    Policy,
    StreamingLLM,
    TriAttentionLasting,
    TriAttentionReserve,
    rkv_ranking,
)

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
        if SCORES.shape[1] != layers:
            raise ValueError(f"{self.name}: the copy scores cover {SCORES.shape[1]} layers, the model has {layers}")
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


def valid_inputs(inputs: CompactionInputs, count: int) -> tuple[CompactionInputs, torch.Tensor]:
    """``inputs`` restricted to the first ``count`` slots of each (layer, KV head) that hold a token (position >= 0),
    in temporal order, and their slot indices ``[L, B, Hkv, count]``: what a head of that many slots would hold."""
    held_first = torch.argsort((inputs.positions < 0).to(torch.int8), dim=-1, stable=True)
    idx = held_first[..., :count]

    def take(t: torch.Tensor | None, layer: int | None = None) -> torch.Tensor | None:
        if t is None:
            return None
        i = idx if layer is None else idx[layer]
        return t.gather(-1, i) if t.dim() == i.dim() else t.gather(-2, i[..., None].expand(*i.shape, t.shape[-1]))

    return replace(inputs, keys=[take(k, i) for i, k in enumerate(inputs.keys)],
                   values=[take(v, i) for i, v in enumerate(inputs.values)], positions=take(inputs.positions),
                   attention=take(inputs.attention), distant_attention=take(inputs.distant_attention)), idx


@dataclass
class HeadBudgets(CopyHeads):
    """Per-head budgets at a mean of ``mean`` slots per KV head: ``copy`` for the copy heads (chosen as by CopyHeads),
    whose slots ``triattention-reserve/share=SHARE`` ranks, and the rest shared by the other heads, which
    ``triattention-lasting`` ranks (``base`` 1: R-KV, 2: StreamingLLM in every head, at ``mean``; the controls).

    Emulated inside a run whose budget (``--budgets``) is the largest head's: at a compaction a head keeps its best
    ``k`` slots and the other kept slots get position -1, which the pass's attention mask hides and the next
    compaction drops; every policy scores a head's held slots only (:func:`valid_inputs`). The first compaction
    comes at that budget + 128 tokens, so these runs compare with each other, not with runs at the mean budget."""

    mean: int = 256
    copy: int = 384
    share: float = 0.5
    threshold: float = 0.1
    base: int = 0
    layers: int = 0  # 1: per-layer budgets (every head of a layer with a copy head keeps ``copy``); 2: and ranked
    # as a copy head
    name: str = "head-budgets"

    def chosen(self, layers: int) -> torch.Tensor:
        """``[L, Hkv]`` bool: the copy heads (none for the controls)."""
        chosen = super().chosen(layers) & (self.base == 0)
        return chosen.any(1, keepdim=True).expand_as(chosen) if self.layers == 2 else chosen

    def head_budgets(self, chosen: torch.Tensor, cap: int) -> torch.Tensor:
        """``[L, 1, Hkv, 1]`` slots each KV head keeps (``chosen`` of that shape): ``copy`` in the copy heads (with
        ``layers=1``, in every head of their layers), the rest of ``mean`` per head spread evenly over the others
        (rounded down)."""
        if self.layers:
            chosen = chosen.any(2, keepdim=True).expand_as(chosen)
        copies, heads = int(chosen.sum()), chosen.numel()
        if (copies and self.copy > cap) or self.mean > cap or copies * self.copy > heads * self.mean:
            raise ValueError(f"{self.name}: copy={self.copy} and mean={self.mean} must fit the run's budget {cap}, "
                             f"and {copies} copy heads must fit the mean")
        others = (heads * self.mean - copies * self.copy) // max(heads - copies, 1)
        return torch.where(chosen, self.copy, others)

    def rankings(self) -> tuple[Policy, Policy]:
        """The rankings of the copy heads and of the others."""
        if self.base == 1:
            return RKV(query_window=self.query_window), RKV(query_window=self.query_window)
        if self.base == 2:
            return StreamingLLM(), StreamingLLM()
        return TriAttentionReserve(share=self.share, query_window=self.query_window), TriAttentionLasting()

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        device = inputs.positions.device
        chosen = self.chosen(len(inputs.keys)).to(device)[:, None, :, None]  # [L, 1, Hkv, 1]
        budgets = self.head_budgets(chosen, inputs.budget)
        n = inputs.positions.shape[-1]
        held = (inputs.positions >= 0).sum(-1, keepdim=True)  # [L, B, Hkv, 1]
        expected = budgets + (n - inputs.budget) if inputs.round else torch.full_like(budgets, n)
        if not torch.equal(held, expected.expand_as(held)):
            raise RuntimeError(f"{self.name}: heads hold {held.unique().tolist()} tokens, expected "
                               f"{expected.unique().tolist()}: the masking did not take")
        out = torch.full(inputs.positions.shape, -torch.inf, device=device)
        for policy, ranked_by in zip(self.rankings(), (chosen, ~chosen)):
            for k in budgets.unique().tolist():  # a group: one ranking, one budget (so as many held tokens)
                member = ranked_by & (budgets == k)
                if not member.any():
                    continue
                first = member.nonzero()[0].tolist()
                sub, idx = valid_inputs(inputs, int(held[first[0], 0, first[2], 0]))
                ranked = policy.scores(replace(sub, budget=k)).float().clamp_min(-1e30)  # -inf ties with the dropped
                out = torch.where(member, out.scatter(-1, idx, ranked), out)
        keep = out.argsort(-1, descending=True).argsort(-1) < budgets
        inputs.positions.masked_fill_(~keep, -1)  # a view of the cache's slot positions: the dropped are hidden
        return out.masked_fill(~keep, -torch.inf)


CONTROLS = {"lasting": "head-budgets/threshold=9", "rkv": "head-budgets/base=1", "streamingllm": "head-budgets/base=2"}


def pairs(folder: str, budget: int, options: str = "") -> None:
    """Per policy of an eval folder: the share of the StreamingLLM control's gap to full attention closed, and the
    paired NLL differences to the lasting and R-KV controls (95% block-bootstrap intervals), over its documents; the
    controls' names end in ``,OPTIONS`` when given (e.g. ``mean=128``)."""
    from triattn_compile.evaluation.report import gap_closed, paired_difference

    controls = {k: f"{v},{options}" if options else v for k, v in CONTROLS.items()}

    per_token = torch.load(f"{folder}/per_token.pt")
    docs = [key.partition("|")[2] for key in per_token if key.startswith("full|")]
    names = sorted({key.split("|")[0] for key in per_token if key.count("|") == 2})
    for name in names:
        gap = gap_closed(per_token, name, budget, docs, reference=controls["streamingllm"])
        line = f"{name:32s} gap closed {gap[0]:+.0%} [{gap[1]:+.0%}, {gap[2]:+.0%}]"
        for control in ("lasting", "rkv"):
            diff = paired_difference(per_token, name, controls[control], budget, docs)
            line += f"  vs {control} {diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]"
        print(line)


def main() -> int:
    global SCORES
    if sys.argv[1:2] == ["pairs"]:
        pairs(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
        return 0
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
    POLICIES[HeadBudgets.name] = HeadBudgets
    from triattn_compile.cli import main as triattn

    return triattn(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
