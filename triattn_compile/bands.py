"""How a head's rotary dims pair into RoPE bands: ``half`` (rotate-half: band f = (x[f], x[f + F])) or
``interleaved`` (rotate-every-two: band f = (x[2f], x[2f + 1])). Shared by calibration (the captured query bands) and
scoring (the keys' bands), which import nothing of each other.
"""

from __future__ import annotations

import torch

PAIRINGS = ("half", "interleaved")


def to_complex_pairs(x: torch.Tensor, pairing: str, rotary_dim: int | None = None) -> torch.Tensor:
    """View the rotary part of ``x[..., D]`` as complex bands ``[..., F]`` (F = rotary_dim / 2).

    ``half``: band f = x[f] + i x[f + F] (rotate-half, Llama). ``interleaved``: band f = x[2f] + i x[2f + 1] (GPT-J).
    """
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    x = x[..., :r].float() if x.dtype not in (torch.float32, torch.float64) else x[..., :r]
    return torch.complex(*band_parts(x, pairing, r))


def band_parts(x: torch.Tensor, pairing: str, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the rotary bands of ``x[..., D]`` (:func:`to_complex_pairs` without a complex
    dtype, which Inductor does not generate code for)."""
    if pairing == "half":
        return x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
    if pairing == "interleaved":
        return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    raise ValueError(f"unknown rotary pairing {pairing!r}; expected one of {PAIRINGS}")


def from_complex_pairs(z: torch.Tensor, pairing: str) -> torch.Tensor:
    """Inverse of :func:`to_complex_pairs` for the rotary part: ``[..., F]`` complex -> ``[..., 2F]`` real."""
    if pairing == "half":
        return torch.cat([z.real, z.imag], dim=-1)
    if pairing == "interleaved":
        return torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    raise ValueError(f"unknown rotary pairing {pairing!r}; expected one of {PAIRINGS}")
