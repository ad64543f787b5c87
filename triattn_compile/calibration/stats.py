"""Pre-RoPE query statistics: running sums in memory, a validated safetensors file on disk.

Per (layer, query head, band f) TriAttention needs the complex mean q̄_f and the mean magnitude E|q_f|
(TRIATTENTION.md §1.2); with partial rotary it also needs the mean of the pass-through (non-rotary) query dims,
whose dot product with a key is position-independent (``kernels/scoring/naive.py``). :class:`QueryStats` keeps them
as running sums so that online calibration (the capture op adds every live query) and offline statistics (loaded as
``mean * tokens``) share one representation.

File format ``triattn-stats/2``: tensors ``q_mean_real``, ``q_mean_imag``, ``q_abs_mean`` (float32 ``[L, H, F]``),
``q_pass_mean`` (float32 ``[L, H, head_dim - rotary_dim]``) and string metadata (``format``, layer/head counts,
head_dim, rotary_dim, rotary_start, pairing, rope fingerprint, attention scaling, tokens; from offline calibration
also ``documents``, ``contexts`` and ``context_length``, which loading does not need), and, from files written since
the vLLM leg, ``omega`` (float64 ``[L, F]``, the RoPE frequencies the fingerprint hashes). ``triattn-stats/1`` files
(no ``q_pass_mean``) still load for fully rotary models.
Files are written to a temporary name and renamed, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from triattn_compile.calibration.contexts import CalibrationReport

FORMAT = "triattn-stats/2"
_FORMATS_FULLY_ROTARY = (FORMAT, "triattn-stats/1")  # version 1 lacks q_pass_mean, which is empty there


class StatsError(ValueError):
    """A statistics file that cannot be used with this model (message is one line and says what to do)."""


@dataclass(frozen=True)
class RotarySignature:
    """What a stats file must agree on with the model it is used for."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    pairing: str
    rope_fingerprint: str
    attention_scaling: float
    nope_layers: str = ""  # comma-separated indices of layers without RoPE (all their dims pass through)
    rotary_start: int = 0  # first rotary dim of the head (trailing partial rotary: head_dim - rotary_dim)

    @property
    def num_bands(self) -> int:
        return self.rotary_dim // 2

    @property
    def num_pass(self) -> int:
        """Width of the pass-through statistics: ``head_dim - rotary_dim``, or ``head_dim`` when some layers have no
        RoPE (right-aligned: a RoPE layer's leading ``rotary_dim`` entries stay zero)."""
        return self.head_dim if self.nope_layers else self.head_dim - self.rotary_dim


def rope_fingerprint(omegas: torch.Tensor) -> str:
    """Short hash of the RoPE angular frequencies ``[L, F]`` (rounded so float noise does not matter)."""
    rounded = torch.round(omegas.double() * 1e9).to(torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(rounded).hexdigest()[:16]


TENSOR_NAMES = ("sum_re", "sum_im", "sum_abs", "count", "sum_pass")


class QueryStats:
    """Running sums of pre-RoPE query bands: ``sum q_f``, ``sum |q_f|`` and the token count, per layer.

    Args:
        signature: the model's rotary signature (shapes come from it).
    """

    def __init__(self, signature: RotarySignature, device: torch.device | str = "cpu"):
        L, H, F = signature.num_layers, signature.num_heads, signature.num_bands
        self.signature = signature
        self.sum_re = torch.zeros(L, H, F, dtype=torch.float64, device=device)
        self.sum_im = torch.zeros(L, H, F, dtype=torch.float64, device=device)
        self.sum_abs = torch.zeros(L, H, F, dtype=torch.float64, device=device)
        self.count = torch.zeros(L, dtype=torch.float64, device=device)
        self.sum_pass = torch.zeros(L, H, signature.num_pass, dtype=torch.float64, device=device)
        self.report: CalibrationReport | None = None  # what offline calibrate() did (None: online or loaded)
        # the RoPE angular frequencies [L, F] float64 the statistics were taken under (saved as ``omega``: a graph
        # that reads ω with float noise, vLLM's, is compared with a tolerance where the fingerprint must match exactly)
        self.omega: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The state tensors, in the order the custom ops take them (:data:`TENSOR_NAMES`)."""
        return [self.sum_re, self.sum_im, self.sum_abs, self.count, self.sum_pass]

    def tokens(self) -> int:
        """Queries seen per head (the minimum over layers)."""
        return int(self.count.min()) if self.count.numel() else 0

    def q_mean(self) -> torch.Tensor:
        """Complex query centre q̄ ``[L, H, F]`` complex128."""
        n = self.count.clamp_min(1)[:, None, None]
        return torch.complex(self.sum_re / n, self.sum_im / n)

    def q_abs(self) -> torch.Tensor:
        """Mean band magnitude E|q_f| ``[L, H, F]`` float64."""
        return self.sum_abs / self.count.clamp_min(1)[:, None, None]

    def q_pass_mean(self) -> torch.Tensor:
        """Mean of the pass-through query dims ``[L, H, head_dim - rotary_dim]`` float64 (empty if fully rotary)."""
        return self.sum_pass / self.count.clamp_min(1)[:, None, None]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the means and metadata to ``path`` atomically (temporary file, then rename)."""
        if self.tokens() == 0:
            raise StatsError("no queries captured yet: run calibration on some text before saving")
        path = Path(path)
        q_mean = self.q_mean()
        tensors = {
            "q_mean_real": q_mean.real.float().contiguous().cpu(),
            "q_mean_imag": q_mean.imag.float().contiguous().cpu(),
            "q_abs_mean": self.q_abs().float().contiguous().cpu(),
            "q_pass_mean": self.q_pass_mean().float().contiguous().cpu(),
        }
        if self.omega is not None:
            tensors["omega"] = self.omega.double().contiguous().cpu()
        meta = {k: str(v) for k, v in asdict(self.signature).items()}
        meta.update(format=FORMAT, tokens=str(self.tokens()))
        if self.report is not None:
            meta.update(documents=str(self.report.documents), contexts=str(self.report.contexts),
                        context_length=str(self.report.context_length))
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected: RotarySignature, device: torch.device | str = "cpu"):
        """Read a stats file and check it against ``expected`` (the model's signature); raises :class:`StatsError`."""
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"stats file {path} does not exist: run `triattn calibrate` to create it")
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as fh:  # the metadata lives in the JSON header
                (header_len,) = struct.unpack("<Q", fh.read(8))
                meta = json.loads(fh.read(header_len)).get("__metadata__", {})
        except (SafetensorError, OSError, ValueError, struct.error) as exc:
            raise StatsError(
                f"stats file {path} is truncated or not a safetensors file ({exc}); "
                "recreate it with `triattn calibrate`"
            ) from None
        if meta.get("format") != FORMAT and not (
            meta.get("format") in _FORMATS_FULLY_ROTARY and expected.num_pass == 0
        ):
            raise StatsError(f"{path} is not a triattn stats file (format {meta.get('format')!r}, want {FORMAT!r})")
        meta.setdefault("nope_layers", "")  # absent from triattn-stats/1
        meta.setdefault("rotary_start", "0")  # absent from files written before trailing rotary was supported
        for field, want in asdict(expected).items():
            got = meta.get(field)
            same = got is not None and (
                abs(float(got) - want) <= 1e-6 * max(1.0, abs(want)) if isinstance(want, float) else got == str(want)
            )
            if not same:
                raise StatsError(
                    f"stats file {path} was made for another model ({field}: file has {got}, model has {want}); "
                    "calibrate this model with `triattn calibrate`"
                )
        shape = (expected.num_layers, expected.num_heads, expected.num_bands)
        pass_shape = (expected.num_layers, expected.num_heads, expected.num_pass)
        tensors.setdefault("q_pass_mean", torch.zeros(pass_shape) if expected.num_pass == 0 else None)
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "q_pass_mean"):
            t = tensors.get(name)
            want = pass_shape if name == "q_pass_mean" else shape
            if t is None or tuple(t.shape) != want or t.dtype != torch.float32 or not torch.isfinite(t).all():
                desc = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise StatsError(
                    f"stats file {path}: tensor {name} is {desc}, expected finite float32 {want}; "
                    "recreate it with `triattn calibrate`"
                )
        stats = cls(expected, device)
        n = float(meta.get("tokens", "0"))
        if n <= 0:
            raise StatsError(f"stats file {path} records no calibration tokens; recreate it with `triattn calibrate`")
        stats.sum_re.copy_(tensors["q_mean_real"].double() * n)
        stats.sum_im.copy_(tensors["q_mean_imag"].double() * n)
        stats.sum_abs.copy_(tensors["q_abs_mean"].double() * n)
        stats.sum_pass.copy_(tensors["q_pass_mean"].double() * n)
        stats.count.fill_(n)
        stats.omega = tensors.get("omega")
        return stats
