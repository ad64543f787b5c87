"""Statistics for a vLLM engine: a ``triattn calibrate`` file of the model's HF checkpoint, validated against the
layout found in vLLM's graph.

The HF path checks the RoPE frequencies by an exact fingerprint (``calibration/stats.py``). vLLM's graph holds no
``inv_freq``, only a cos/sin table in the model's dtype, so its ω carries that dtype's noise (measured on
SmolLM2-135M in bfloat16: 1.1e-3 relative on the slowest bands): :func:`load_for_layout` compares the file's
``omega`` tensor with a tolerance set by the table's dtype, then lets :meth:`QueryStats.load` check everything else
(layer/head counts, head_dim, rotary dims, pairing, tensor shapes) with its one-line errors. A file whose HF model
broadcast its keys to every query head (HF's Falcon) records as many KV heads as query heads, fewer in vLLM: it is
accepted (:func:`broadcast_keys`), since the statistics are per query head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import safe_open

from triattn_compile.calibration.stats import QueryStats, RotarySignature, StatsError
from triattn_compile.passes.discover import Layout

OMEGA_RTOL = 1e-4  # relative, float32 tables (~1e-9 measured); another rope_theta differs by >1e-2
SCALING_ATOL = 1e-2  # attention scaling measured in the model's dtype (as Layout.same_as)


def _file_metadata(path: Path) -> tuple[dict, torch.Tensor | None]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            omega = fh.get_tensor("omega") if "omega" in fh.keys() else None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise StatsError(f"stats file {path} is truncated or not a safetensors file ({exc}); recreate it with "
                         "`triattn calibrate`") from None
    return meta, omega


def broadcast_keys(meta: dict, expected: RotarySignature) -> bool:
    """Whether a file's ``num_kv_heads`` differs from vLLM's only because the HF model broadcast its keys to every
    query head before its cache (HF's Falcon with ``new_decoder_architecture``: its discovery sees as many KV heads
    as query heads, vLLM keeps the real, fewer, KV heads). The statistics are per query head, in the same order
    (query head ``h`` reads KV head ``h // G`` in both), so they are valid: the file records
    ``num_kv_heads == num_heads``, its ``num_heads`` is vLLM's, and vLLM's KV-head count divides it."""
    heads, kv_heads = expected.num_heads, expected.num_kv_heads
    return (kv_heads < heads and heads % kv_heads == 0
            and meta.get("num_heads") == meta.get("num_kv_heads") == str(heads))


def load_for_layout(path: str | Path, layout: Layout, omega_rtol: float = OMEGA_RTOL) -> QueryStats:
    """The statistics in ``path`` if they were made for the model whose vLLM graph has ``layout``, whose ω was read
    to ``omega_rtol`` relative (``VllmLayout.omega_rtol``: coarser from a bfloat16 cos/sin table).

    Raises:
        StatsError: one line, e.g. another model's file (which field differs), or a file without ``omega``.
    """
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"stats file {path} does not exist: run `triattn calibrate` to create it")
    meta, omega = _file_metadata(path)
    expected = layout.signature
    if broadcast_keys(meta, expected):  # per-query-head statistics: valid for vLLM's grouped heads
        expected = dataclasses.replace(expected, num_kv_heads=expected.num_heads)
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rotary_dim", "pairing"):
        if meta.get(field) != str(getattr(expected, field)):
            raise StatsError(f"stats file {path} was made for another model ({field}: file has {meta.get(field)}, "
                             f"vLLM's graph has {getattr(expected, field)}); calibrate this model with "
                             "`triattn calibrate`")
    if omega is None:
        raise StatsError(f"stats file {path} has no omega tensor (written before the vLLM leg); recreate it with "
                         "`triattn calibrate`")
    mine = layout.omega.double()
    if tuple(omega.shape) != tuple(mine.shape) or not torch.allclose(omega.double(), mine, rtol=omega_rtol, atol=0):
        where = ""
        if omega.shape == mine.shape:
            error = (omega.double() - mine).abs() / mine.abs().clamp_min(1e-30)
            worst = int(error.argmax())
            layer, band = divmod(worst, mine.shape[-1]) if mine.dim() > 1 else (0, worst)
            where = (f" by up to {float(error.flatten()[worst]):.3g} relative, at layer {layer} band {band}: file "
                     f"{float(omega.flatten()[worst]):.9g}, graph {float(mine.flatten()[worst]):.9g};")
        raise StatsError(f"stats file {path} was made for another model (RoPE frequencies differ from vLLM's "
                         f"graph{where} shape {tuple(omega.shape)} vs {tuple(mine.shape)}); calibrate this model with "
                         "`triattn calibrate`")
    scaling = float(meta.get("attention_scaling", "nan"))
    if not abs(scaling - expected.attention_scaling) <= SCALING_ATOL:
        raise StatsError(f"stats file {path} was made for another model (attention_scaling: file has {scaling}, "
                         f"vLLM's graph has {expected.attention_scaling}); calibrate this model with "
                         "`triattn calibrate`")
    # ω and the scaling agree within tolerance: check the rest exactly against the file's own values of those two
    expected = dataclasses.replace(expected, rope_fingerprint=meta.get("rope_fingerprint", ""),
                                   attention_scaling=scaling)
    return QueryStats.load(path, expected)
