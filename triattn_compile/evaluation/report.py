"""Markdown tables (tabulate) and the budget-quality plot (matplotlib) from a ``results.json`` dict."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

import torch


def _grid(result: dict, value) -> tuple[list[str], list[int], dict]:
    policies = list(dict.fromkeys(r["policy"] for r in result["rows"]))
    budgets = sorted({r["budget"] for r in result["rows"]})
    cells = {(r["policy"], r["budget"]): value(r) for r in result["rows"]}
    return policies, budgets, cells


def _table(result: dict, value, full_value, fmt: str, mark=None) -> str:
    from tabulate import tabulate

    policies, budgets, cells = _grid(result, value)
    rows = [["full attention", *[format(full_value, fmt)] * len(budgets)]]
    for p in policies:
        row = [p]
        for b in budgets:
            v = cells.get((p, b))
            text = "" if v is None else format(v, fmt)
            if mark and v is not None and mark(p, b):
                text += "*"
            row.append(text)
        rows.append(row)
    return tabulate(rows, headers=["policy", *[f"B={b}" for b in budgets]], tablefmt="github", disable_numparse=True)


def _continuation_tables(result: dict, uncompressed: set) -> list[str]:
    full, cfg = result["full"], result["config"]
    return [
        f"## Greedy continuation ({cfg['continuation_tokens']} tokens by full attention after a "
        f"{cfg['prompt_tokens']}-token prompt of `{result['sources']['continuation_prompt']}`)",
        "",
        "Fraction predicted identically under teacher forcing (* = the sequence never filled the cache, so the run "
        "is full attention by construction):",
        "",
        _table(result, lambda r: r["continuation"]["agreement"], full["continuation"]["agreement"], ".3f",
               mark=lambda p, b: (p, b, "continuation") in uncompressed),
        "",
        "First divergence of free greedy generation (tokens into the continuation):",
        "",
        _table(result, lambda r: r["continuation"]["first_divergence"], full["continuation"]["first_divergence"], "d",
               mark=lambda p, b: (p, b, "continuation") in uncompressed),
        "",
    ]


def _retrieval_tables(result: dict, uncompressed: set) -> list[str]:
    full, cfg = result["full"], result["config"]
    seeds = len(cfg.get("probe_seeds") or [0])
    return [
        f"## Retrieval probe ({len(result['probe_facts'])} facts, then {cfg['filler_tokens']} tokens of "
        f"`{result['sources']['probe_filler']}`, then the questions; {result['probe_length']} tokens; "
        f"{seeds} seed(s), {seeds * len(result['probe_facts'])} facts in all)",
        "",
        "Fraction of facts recalled exactly (* = never compacted):",
        "",
        _table(result, lambda r: r["retrieval"], full["retrieval"], ".2f",
               mark=lambda p, b: (p, b, "retrieval") in uncompressed),
        "",
    ]


def _probe_tables(result: dict, uncompressed: set) -> list[str]:
    """The continuation and retrieval tables, for the probes the run made."""
    full = result["full"]
    return ((_continuation_tables(result, uncompressed) if "continuation" in full else [])
            + (_retrieval_tables(result, uncompressed) if "retrieval" in full else []))


def paired_difference(per_token: dict, a: str, b: str, budget: int, docs: list[str], block: int = 128,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """Mean per-token NLL of policy ``a`` minus ``b`` at ``budget`` over ``docs``, with a 95% block-bootstrap
    interval (blocks of ``block`` consecutive scored tokens, so that correlated neighbours resample together)."""
    keys = [(f"{a}|{budget}|{d}", f"{b}|{budget}|{d}") for d in docs]
    if not all(ka in per_token and kb in per_token for ka, kb in keys):
        return None
    diff = torch.cat([per_token[ka].double() - per_token[kb].double() for ka, kb in keys])
    blocks = _blocks(diff, block)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, blocks.numel(), (resamples, blocks.numel()), generator=gen)
    means = blocks[idx].mean(1)
    return diff.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def _blocks(diff: torch.Tensor, block: int) -> torch.Tensor:
    n = diff.numel() // block * block
    return diff[:n].view(-1, block).mean(1)


def gap_closed(per_token: dict, policy: str, budget: int, docs: list[str], reference: str = "streamingllm",
               block: int = 128, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """Fraction of ``reference``'s NLL gap to full attention that ``policy`` closes at ``budget`` over ``docs``,
    ``(NLL_ref - NLL_policy) / (NLL_ref - NLL_full)``, with a 95% block-bootstrap interval (numerator and
    denominator resampled on the same blocks). Needs the per-token NLL of full attention (``full|DOC``)."""
    keys = [(f"{reference}|{budget}|{d}", f"{policy}|{budget}|{d}", f"full|{d}") for d in docs]
    if not all(k in per_token for ks in keys for k in ks):
        return None
    ref, pol, full = (torch.cat([per_token[ks[i]].double() for ks in keys]) for i in range(3))
    gain, gap = _blocks(ref - pol, block), _blocks(ref - full, block)
    idx = torch.randint(0, gain.numel(), (resamples, gain.numel()), generator=torch.Generator().manual_seed(seed))
    ratios = gain[idx].mean(1) / gap[idx].mean(1)
    return (gain.mean() / gap.mean()).item(), ratios.quantile(0.025).item(), ratios.quantile(0.975).item()


def _gap_table(result: dict, per_token: dict, reference: str = "streamingllm") -> str | None:
    from tabulate import tabulate

    policies, budgets, _ = _grid(result, lambda r: 0)
    docs = list(result["full"]["nll"])
    rows = []
    for p in policies:
        cells = [gap_closed(per_token, p, b, docs, reference) for b in budgets]
        if p != reference and any(c is not None for c in cells):
            rows.append([p, *["" if c is None else f"{c[0]:+.0%} [{c[1]:+.0%}, {c[2]:+.0%}]" for c in cells]])
    if not rows:
        return None
    return tabulate(rows, headers=["policy", *[f"B={b}" for b in budgets]], tablefmt="github", disable_numparse=True)


def _paired_table(result: dict, per_token: dict, reference: str) -> str | None:
    from tabulate import tabulate

    policies, budgets, _ = _grid(result, lambda r: 0)
    docs = list(result["full"]["nll"])
    rows = []
    for p in policies:
        if p == reference:
            continue
        cells = [paired_difference(per_token, p, reference, b, docs) for b in budgets]
        if all(c is None for c in cells):
            continue
        rows.append([p, *["" if c is None else f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]" for c in cells]])
    if not rows:
        return None
    return tabulate(rows, headers=["policy", *[f"B={b}" for b in budgets]], tablefmt="github", disable_numparse=True)


def markdown(result: dict, per_token: dict | None = None) -> str:
    """All tables of a run, with the settings that produced them (``per_token``: per-token NLL per cell, for the
    paired differences against TriAttention)."""
    full = result["full"]
    docs = list(full["nll"])
    uncompressed = {(r["policy"], r["budget"], k) for r in result["rows"] for k in ("continuation", "retrieval")
                    if not r.get(f"{k}_compressed", True)}
    cfg = result["config"]
    out = [
        "# Quality vs KV budget",
        "",
        f"Model: {result['model']}. Documents ({cfg['doc_tokens']} tokens each): "
        + ", ".join(f"`{p}`" for p in result["sources"]["documents"].values())
        + f". Scored positions: {result['first_scored_position']}..{cfg['doc_tokens'] - 1} of each document "
        f"({result['scored_tokens_per_document']} tokens; every budget has compacted before them). "
        f"TriAttention statistics: {result['sources']['calibration']} ({cfg['calibration_tokens']} tokens).",
        "",
        "## Teacher-forced NLL (nats/token, mean over documents; lower is better)",
        "",
        _table(result, lambda r: mean(r["nll"].values()), mean(full["nll"].values()), ".4f"),
        "",
        "## Top-1 agreement with full attention on the documents (same scored positions)",
        "",
        _table(result, lambda r: mean(r["top1_agreement"].values()), 1.0, ".3f"),
        "",
        "## Per document NLL",
        "",
    ]
    out[-2:-2] = _probe_tables(result, uncompressed)
    paired = _paired_table(result, per_token or {}, "triattention")
    if paired:
        out[-2:-2] = ["## NLL difference to TriAttention, same tokens (95% block-bootstrap interval; > 0: TriAttention "
                      "better)", "", paired, ""]
    gaps = _gap_table(result, per_token or {})
    if gaps:
        out[-2:-2] = ["## Share of StreamingLLM's NLL gap to full attention closed, same tokens (95% block-bootstrap "
                      "interval; 100%: as good as full attention, 0%: as StreamingLLM)", "", gaps, ""]
    for d in docs:
        out += [f"`{d}`:", "", _table(result, lambda r, d=d: r["nll"][d], full["nll"][d], ".4f"), ""]
    if result.get("free_greedy_check"):
        c = result["free_greedy_check"]
        out += [f"Check: {c['policy']} at B={c['budget']}: first divergence read from teacher forcing "
                f"{c['teacher_forced']}, measured by free greedy generation {c['free_greedy']}.", ""]
    t = result["timing"]
    if not result.get("complete", True):
        cells = len(cfg["policies"]) * len(cfg["budgets"])
        out += [f"**Partial run: {len(result['rows'])} of {cells} (policy, budget) cells done; rerun the same "
                "command to finish (finished cells are kept).**", ""]
    out += [f"Wall time: {t['total_s'] / 60:.1f} min (full attention references {t['full_attention_s']:.0f} s, "
            f"calibration {t['calibration_s']:.0f} s).", ""]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """Quality vs budget, one line per policy: NLL, document top-1 agreement, continuation agreement, retrieval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = result["full"]
    panels = [
        ("teacher-forced NLL (lower is better)", lambda r: mean(r["nll"].values()), mean(full["nll"].values())),
        ("top-1 agreement with full (documents)", lambda r: mean(r["top1_agreement"].values()), 1.0),
    ]
    if "continuation" in full:
        panels.append(("greedy continuation agreement", lambda r: r["continuation"]["agreement"],
                       full["continuation"]["agreement"]))
    if "retrieval" in full:
        panels.append(("retrieval: facts recalled", lambda r: r["retrieval"], full["retrieval"]))
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (title, value, ref) in zip(axes, panels):
        policies, budgets, cells = _grid(result, value)
        for p in policies:
            bs = [b for b in budgets if (p, b) in cells]
            style = "--" if p.startswith("triattention-") else "-"
            ax.plot(bs, [cells[(p, b)] for b in bs], style, marker="o", ms=3, label=p)
        ax.axhline(ref, color="black", lw=1, ls=":", label="full attention")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("KV budget per KV head")
        ax.set_title(title, fontsize=10)
    for ax in axes[len(panels):]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
