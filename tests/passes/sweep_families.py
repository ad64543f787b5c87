"""Sweep every RoPE decoder that transformers ships through ``optimize`` and write ``docs/sweep.md``.

Usage: ``python tests/passes/sweep_families.py`` (about 15 minutes on 2 cores; not part of the test suite). Each
model module whose source mentions RoPE and that has a ``*ForCausalLM`` class is built from its own config class
with the same tiny generic settings (2 layers, hidden 64, 4 heads / 2 KV heads, sliding windows set to 32; eager
attention where the class refuses sdpa), in a subprocess of its own (a 3-minute limit, so that one huge default
config cannot stop the sweep). Families already in ``test_families.FAMILIES`` (with hand-picked settings) are
skipped. Outcome per family:

* ``exact``: ``optimize`` works, greedy tokens equal the unmodified model's while the sequence fits, and the cache
  stays at ``budget + 128``-style capacity through compactions;
* ``refused``: ``optimize`` raised its one-line error (shown);
* ``diverged`` / ``unbounded``: it ran but broke one of those two properties (a bug);
* ``not built``: the generic config does not build or run that model at all (not the pass's doing).
"""

from __future__ import annotations

import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE.parents[1] / "docs" / "sweep.md"


def candidates() -> list[str]:
    import transformers.models as models

    sys.path.insert(0, str(HERE))
    from test_families import FAMILIES

    known = {f.config.__name__ for f in FAMILIES.values()}
    found = []
    for name in sorted(m.name for m in pkgutil.iter_modules(models.__path__)):
        try:
            module = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["_"])
        except Exception:
            continue
        source = inspect.getsource(module).lower()
        causal = [c for k, c in vars(module).items() if k.endswith("ForCausalLM") and inspect.isclass(c)]
        config = getattr(causal[0], "config_class", None) if causal else None
        if ("rotary" in source or "rope" in source) and config is not None and config.__name__ not in known:
            found.append(name)
    return found


def run_one(name: str) -> dict:
    """Build ``name``, optimize it, check exactness and boundedness (runs in the subprocess)."""
    import torch

    sys.path.insert(0, str(HERE))
    from test_families import _greedy

    import triattn_compile as tc

    module = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["_"])
    cls = next(c for k, c in vars(module).items() if k.endswith("ForCausalLM") and inspect.isclass(c))
    try:
        torch.manual_seed(0)
        config = cls.config_class(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if getattr(config, "sliding_window", None):
            config.sliding_window = 32
        try:
            config._attn_implementation = "sdpa"
            model = cls(config).eval()
        except ValueError:
            config._attn_implementation = "eager"
            model = cls(config).eval()
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
        ids = torch.randint(3, 128, (1, 10))
        ref = _greedy(model, ids, 12)
    except Exception as exc:
        return {"outcome": "not built", "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    try:
        tc.optimize(model, budget=48, divide_length=16, compiler="eager")
        same = torch.equal(_greedy(model, ids, 12), ref)
        _greedy(model, ids, 60)
    except ValueError as exc:  # PatternNotFound, PassError and the other one-line errors
        return {"outcome": "refused", "detail": str(exc)}
    cache = tc.current_cache(model)
    bounded = cache.peak_occupancy() == 64 and cache.compactions() >= 1
    outcome = "exact" if same and bounded else "diverged" if not same else "unbounded"
    return {"outcome": outcome, "detail": tc.inspect(model).layout.describe()}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2])))
        return 0
    import transformers

    rows = []
    for name in candidates():
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=180)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "outcome": "not built", "detail": f"process exited with {done.returncode}"}
        except subprocess.TimeoutExpired:
            result = {"outcome": "not built", "detail": "over 3 minutes (a large default config)"}
        rows.append((name, result["outcome"], result["detail"].replace("|", "/")))
        print(f"{name}: {result['outcome']}", flush=True)
    counts = {k: sum(r[1] == k for r in rows) for k in ("exact", "refused", "diverged", "unbounded", "not built")}
    lines = [
        "# Sweep: every other RoPE decoder in transformers through `optimize`",
        "",
        f"Generated by `python tests/passes/sweep_families.py` (transformers {transformers.__version__}); "
        "settings and outcomes are explained in that script's docstring. Families with hand-picked settings are in "
        "[families.md](families.md).",
        "",
        "Counts: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".",
        "",
        "| module | outcome | what the pass recognised, or the error |",
        "|---|---|---|",
        *(f"| {n} | {o} | {d} |" for n, o, d in rows),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}: {counts}")
    return 0 if counts["diverged"] == counts["unbounded"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
