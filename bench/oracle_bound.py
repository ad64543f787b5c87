"""How much of StreamingLLM's NLL gap any keep set can close under the evaluation's schedule: an oracle that knows
the attention the next tokens will pay.

    python bench/oracle_bound.py --reference results/quality-beyond --budget 256 --horizons 1 4 0 --out DIR

Not a policy anyone can deploy: before each compaction (next position ``p``) it reads, from a full-attention run of
the same document, the attention probabilities of the queries at ``p .. p + 128·horizon - 1`` (``horizon`` 0: every
later query), takes per layer and KV head the mean over those queries and the max over the GQA group, and keeps
the ``budget`` slots those queries attend to most (per layer, or averaged over layers with ``--shared``). Everything
else is the evaluation's (``triattn eval``): its documents, statistics-free schedule (compaction at B + 128, back to
B, no prompt protection), the same compiled graph and teacher forcing. The reference run's ``per_token.pt`` gives
full attention, StreamingLLM and the other policies on the same tokens, so the printed shares of StreamingLLM's gap
are paired; the script checks that its own full-attention NLL reproduces the reference's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import triattn_compile as tc
from triattn_compile.evaluation import documents, nll
from triattn_compile.evaluation.harness import PolicySwitch
from triattn_compile.evaluation.report import gap_closed
from triattn_compile.loading import load_model
from triattn_compile.policies import CompactionInputs, Policy

CHUNK = 128


@torch.no_grad()
def future_attention(model, ids: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[C, L, Hkv, T]``: for every chunk ``c`` of 128 queries, per layer and KV head, the full-attention
    probability each key position receives, mean over the chunk's queries, max over the GQA group."""
    from transformers import DynamicCache

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    try:
        cache, rows = DynamicCache(), []
        for start in range(0, ids.numel(), CHUNK):
            out = model(input_ids=ids[None, start : start + CHUNK], past_key_values=cache, use_cache=True,
                        output_attentions=True)
            per_layer = []
            for probs in out.attentions:  # [1, H, q, S]
                mean = probs[0].float().mean(1)  # [H, S]
                per_layer.append(mean.view(kv_heads, -1, mean.shape[-1]).amax(1))  # [Hkv, S]
            row = torch.stack(per_layer)  # [L, Hkv, S]
            rows.append(torch.nn.functional.pad(row, (0, ids.numel() - row.shape[-1])))
        return torch.stack(rows)
    finally:
        model.set_attn_implementation(previous)


@dataclass
class FutureAttentionOracle(Policy):
    """Keeps what the next ``horizon`` chunks of queries attend to most under full attention (0: all later ones)."""

    horizon: int = 1
    shared: bool = False
    table: torch.Tensor = field(default=None, repr=False)  # future_attention() of the document being scored
    name: str = "oracle"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        first = inputs.next_position // CHUNK
        last = self.table.shape[0] if self.horizon == 0 else first + self.horizon
        window = self.table[first:last].mean(0)  # [L, Hkv, T]
        pos = inputs.positions[:, 0].long()  # [L, Hkv, N]
        scores = window.gather(-1, pos)[:, None]  # [L, 1, Hkv, N]
        return scores.mean(0, keepdim=True) if self.shared else scores


def most_kept_old(table: torch.Tensor, ids: torch.Tensor, tokenizer, position: int, budget: int,
                  k: int) -> list[tuple[int, str, int]]:
    """``(position, token, keep sets)``: the ``k`` tokens older than ``budget + 128`` at ``position`` that the
    all-future oracle keeps in the most (layer, KV head) keep sets, of ``L · Hkv``."""
    future = table[position // CHUNK :].mean(0)[..., :position]  # [L, Hkv, position]
    kept = future.topk(budget, -1).indices.flatten()
    count = torch.zeros(position).index_add_(0, kept, torch.ones(kept.numel()))
    count[position - budget - CHUNK :] = 0
    top = count.topk(k).indices
    return [(int(i), tokenizer.decode(ids[i]), int(count[i])) for i in top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, required=True, help="a `triattn eval` output folder (its documents)")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 0])
    p.add_argument("--shared", action="store_true", help="one keep set for all layers (mean over layers)")
    p.add_argument("--show-kept", type=int, default=0, metavar="K",
                   help="instead: print, per document, the K old tokens (more than B + 128 back at the first scored "
                   "position) that the all-future oracle keeps in most (layer, KV head) keep sets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = json.loads((args.reference / "results.json").read_text())
    per_token = torch.load(args.reference / "per_token.pt")
    cfg = ref["config"]
    first = ref["first_scored_position"]
    model, tokenizer = load_model(cfg["model"])
    kv_heads = model.config.num_key_value_heads
    docs = {d: documents.tokenize(tokenizer, documents.document_text(d), cfg["doc_tokens"], d)
            for d in cfg["documents"]}
    tables = {}
    for d, ids in docs.items():
        full = nll.teacher_force(model, ids, compressed=False).nll[first - 1 :]
        drift = (full.mean() - per_token[f"full|{d}"].mean()).abs().item()
        if drift > 1e-4:  # float32 sums in another order (thread count, library build)
            raise SystemExit(f"full attention on {d} differs from the reference by {drift:.2e} nats: not the same "
                             "model or tokens")
        tables[d] = future_attention(model, ids, kv_heads)
        if args.show_kept:
            print(d, most_kept_old(tables[d], ids, tokenizer, first, args.budget, args.show_kept), flush=True)
    if args.show_kept:
        return
    switch = PolicySwitch()
    div = min(cfg["divide_length"], args.budget)
    tc.optimize(model, budget=args.budget, divide_length=div, protect_prompt=False, compiler=cfg["compiler"],
                policy=switch)
    results = {}
    for horizon in args.horizons:
        name = f"oracle/horizon={horizon}{',shared' if args.shared else ''}"
        tokens = {}
        for d, ids in docs.items():
            switch.inner = FutureAttentionOracle(horizon=horizon, shared=args.shared, table=tables[d])
            tokens[d] = nll.teacher_force(model, ids, compressed=True).nll[first - 1 :].float()
        results[name] = tokens
        print(name, {d: round(t.mean().item(), 4) for d, t in tokens.items()}, flush=True)
    tc.restore(model)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(results, args.out / "per_token.pt")
    for name, tokens in results.items():
        per_token.update({f"{name}|{args.budget}|{d}": t for d, t in tokens.items()})
    names = [k for k in ("triattention", "snapkv", "rkv", "triattention-vnorm/weight=0.25")
             if f"{k}|{args.budget}|{next(iter(docs))}" in per_token] + list(results)
    mean = lambda key: torch.cat([per_token[f"{key}|{d}"] for d in docs]).mean().item()  # noqa: E731
    lines = [f"# Oracle bound, B = {args.budget}, on the documents of {args.reference}", "",
             f"full attention {mean('full'):.4f}, StreamingLLM {mean(f'streamingllm|{args.budget}'):.4f}", "",
             "| policy | NLL | share of StreamingLLM's gap closed [95% block bootstrap] |", "|---|---|---|"]
    for name in names:
        share, low, high = gap_closed(per_token, name, args.budget, list(docs))
        lines.append(f"| {name} | {mean(f'{name}|{args.budget}'):.4f} | {share:+.0%} [{low:+.0%}, {high:+.0%}] |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
