"""Reference TriAttention scoring: the paper's equations in plain PyTorch.

This module is the test oracle and the CPU path. Two forms of the same score:

* :func:`naive_score_prerope` — the paper's form (TRIATTENTION.md §1.3–1.5): invert RoPE with each key's absolute
  position, then evaluate S_trig at all 17 offsets and average, plus S_norm.
* :func:`score_postrope` — the §1.8 form on rotated keys, no key positions. Because the score is linear in
  ``cos/sin(ω_f t)``, the mean over offsets folds into one complex weight per band and round,
  ``W_f = mean_δ exp(i ω_f (t0 + δ))``, so the trig term is a dot product of each key with a per-round vector.
  :func:`fold_query_stats` makes those vectors once per round (a :class:`FoldedQuery`); the scorers take
  ``(keys, folded)``.

Shapes: B batch, H query heads, Hkv KV heads (G = H / Hkv), N keys, D head_dim, F rotary bands, L layers,
P = D - 2F pass-through (non-rotary) dims.

**Pass-through dims** (partial rotary: GPT-NeoX, Phi, GLM; NoPE parts; MLA). Split a head as
``q = [q_rot (2F dims) ; q_pass (P dims)]``, likewise ``k``. RoPE rotates only the first part, so

    q(t)·k(p) = Σ_f s² Re(q_f conj(k_f) e^{iω_f (t-p)})  +  Σ_d q_pass,d k_pass,d .

TriAttention replaces the future query by its calibrated statistics. For the rotary bands that gives S_trig + S_norm
(§1.3–1.4). The pass-through part does not depend on Δ = t - p, so its expectation over queries is exactly
``Σ_d q̄_pass,d k_pass,d`` with ``q̄_pass = E[q_pass]`` (linear: no approximation), and the mean over the future
offsets leaves it unchanged. It is not multiplied by s² (the attention scaling only scales cos/sin). It adds to the
score of every query head before the z-score; without it, a partial-rotary model is ranked on its rotary dims only.
(No norm term is added for these dims: the paper's S_norm is a per-band heuristic for the rotating fluctuation.)
A NoPE layer is the case F = 0 (its q̄/E|q| bands are zero): its whole head is pass-through, ``q̄ · k``.

**MLA** (DeepSeek-V2/V3): ``q = [q_nope ; q_pe]``, ``k = [k_nope ; k_pe]`` with ``k_pe`` (rotated, one per token,
shared by all heads) and ``k_nope = W_UK c_kv`` (per head, from the latent ``c_kv``). The same split gives the
non-rotary term ``q̄_nope · k_nope = (W_UKᵀ q̄_nope) · c_kv``: with the absorbed projection the term can be scored
on the latent cache directly, one dot product per head with the folded query centre ``W_UKᵀ q̄_nope``
(:func:`fold_latent_query`); the scored key is ``[k_pe ; c_kv]``, one per token for all heads (the GQA group is every
head). The rotary dims come last in MLA's query; statistics and scored keys list them first (``passes/latent.py``
reads ``W_UK`` off the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triattn_compile.bands import PAIRINGS, band_parts, from_complex_pairs, to_complex_pairs  # noqa: F401
from triattn_compile.config import MAX_OFFSET


def geometric_offsets(max_offset: int = MAX_OFFSET) -> torch.Tensor:
    """Future offsets ``{1, 2, 4, ..., max_offset}`` (17 values for the paper's 65536). Returns ``[O]`` float64."""
    if max_offset < 1:
        raise ValueError(f"max_offset must be >= 1, got {max_offset}")
    powers = [float(2**i) for i in range(max_offset.bit_length()) if 2**i <= max_offset]
    return torch.tensor(powers, dtype=torch.float64)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, omega: torch.Tensor, pairing: str, scale: float = 1.0):
    """Rotate ``x[..., N, D]`` to absolute ``positions[..., N]`` (complex form; ``scale`` = attention scaling).
    The first ``2 * len(omega)`` dims rotate; the rest pass through unchanged (partial rotary)."""
    angle = positions.to(torch.float64)[..., None] * omega.to(torch.float64)
    rot = torch.polar(torch.full_like(angle, scale), angle)
    r = 2 * omega.shape[-1]
    z = to_complex_pairs(x.to(torch.float64), pairing, r) * rot
    return torch.cat([from_complex_pairs(z, pairing).to(x.dtype), x[..., r:]], dim=-1)


def invert_rope(x: torch.Tensor, positions: torch.Tensor, omega: torch.Tensor, pairing: str, scale: float = 1.0):
    """Undo :func:`apply_rope` (divides the rotary dims by ``scale``, rotates them back by ``ω p``)."""
    angle = positions.to(torch.float64)[..., None] * omega.to(torch.float64)
    rot = torch.polar(torch.full_like(angle, 1.0 / scale), -angle)
    r = 2 * omega.shape[-1]
    z = to_complex_pairs(x.to(torch.float64), pairing, r) * rot
    return torch.cat([from_complex_pairs(z, pairing).to(x.dtype), x[..., r:]], dim=-1)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, ...]`` -> ``[B, H, ...]`` (query head h reads KV head h // G)."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def naive_score_prerope(
    keys_pre: torch.Tensor,
    key_positions: torch.Tensor,
    round_start: int,
    q_mean: torch.Tensor,
    q_abs: torch.Tensor,
    omega: torch.Tensor,
    pairing: str,
    offsets: torch.Tensor,
    scale: float = 1.0,
    use_trig: bool = True,
    use_norm: bool = True,
    mlr: bool = True,
    q_pass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper form of S̃ = mean_δ [S_trig(k, Δ0 + δ)] + S_norm(k) [+ q̄_pass·k_pass], evaluated offset by offset.

    Args:
        keys_pre: pre-RoPE keys (RoPE inverted, already divided by the attention scaling) ``[B, Hkv, N, D]``.
        key_positions: absolute position of each key ``[B, Hkv, N]``.
        round_start: absolute position of the next token (Δ0 = round_start - p).
        q_mean: complex query centre q̄ ``[H, F]``. q_abs: E|q_f| ``[H, F]``. omega: ``[F]``.
        offsets: ``[O]`` future offsets. scale: attention scaling s (each band is weighted by s²).
        use_trig / use_norm / mlr: ablations (no S_trig, no S_norm, S_norm without the (1 - R) weight).
        q_pass: mean of the pass-through query dims ``[H, P]`` (partial rotary; ``None`` or P = 0: no term).
    Returns:
        ``[B, H, N]`` float64 scores per query head.
    """
    H, F = q_mean.shape
    k = _expand_kv(to_complex_pairs(keys_pre.to(torch.float64), pairing, 2 * F), H)  # [B, H, N, F]
    qm = q_mean.to(torch.complex128)[None, :, None, :]
    s2 = float(scale) ** 2
    score = torch.zeros(k.shape[:-1], dtype=torch.float64, device=k.device)
    if use_trig:
        amp = qm.abs() * k.abs()
        phi = qm.angle() - k.angle()
        delta0 = (round_start - _expand_kv(key_positions, H).to(torch.float64))[..., None]  # [B, H, N, 1]
        trig = torch.zeros_like(score)
        for d in offsets.tolist():  # one offset at a time, exactly as Eq. 11 reads
            phase = (delta0 + d) * omega.to(torch.float64) + phi
            trig += (s2 * amp * torch.cos(phase)).sum(-1)
        score += trig / len(offsets)
    if use_norm:
        weight = q_abs.to(torch.float64) - (qm.abs()[0, :, 0] if mlr else 0.0)  # [H, F]
        score += (s2 * weight[None, :, None, :] * k.abs()).sum(-1)
    if q_pass is not None and q_pass.shape[-1]:
        k_pass = _expand_kv(keys_pre[..., 2 * F :].to(torch.float64), H)  # [B, H, N, P]
        score += (k_pass * q_pass.to(torch.float64)[None, :, None, :]).sum(-1)
    return score


def offset_weights(round_start: torch.Tensor | int, omega: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """W_f = mean_δ exp(i ω_f (round_start + δ)), complex128 shaped like ``omega`` ``[..., F]`` (computed in float64:
    ω t reaches 1e5 rad)."""
    t = torch.as_tensor(round_start, dtype=torch.float64).reshape(()) + offsets.to(torch.float64)  # [O]
    angle = t.view(-1, *[1] * omega.dim()) * omega.to(torch.float64)  # [O, ..., F]
    return torch.polar(torch.ones_like(angle), angle).mean(0)


@dataclass(frozen=True)
class FoldedQuery:
    """One round's query side of the post-RoPE score (§1.8), made by :func:`fold_query_stats`; every post-RoPE
    scorer takes ``(keys, folded)``.

    Attributes:
        u_re / u_im: ``u = q̄ W`` (W folds the future offsets), contiguous fp32 ``[H, F]`` (zeros without S_trig).
        w: norm weight ``E|q| - |q̄|`` (``E|q|`` without mlr), contiguous fp32 ``[H, F]`` (zeros without S_norm).
        scale: attention scaling s. pairing: ``"half"`` or ``"interleaved"``.
    """

    u_re: torch.Tensor
    u_im: torch.Tensor
    w: torch.Tensor
    scale: float
    pairing: str

    def to(self, device: torch.device | str) -> FoldedQuery:
        """The same vectors on ``device`` (tensors already there are not copied)."""
        return FoldedQuery(self.u_re.to(device), self.u_im.to(device), self.w.to(device), self.scale, self.pairing)


def fold_query_stats(
    round_start: torch.Tensor | int,
    q_mean: torch.Tensor,
    q_abs: torch.Tensor,
    omega: torch.Tensor,
    pairing: str,
    offsets: torch.Tensor,
    scale: float = 1.0,
    *,
    use_trig: bool = True,
    use_norm: bool = True,
    mlr: bool = True,
) -> FoldedQuery:
    """Fold the calibrated statistics and the future offsets into one round's :class:`FoldedQuery`.

    Args:
        round_start: absolute position of the next token (int or 0-d tensor).
        q_mean: complex query centre q̄ ``[H, F]``. q_abs: E|q_f| ``[H, F]``. omega: rotary frequencies ``[F]``.
            (Leading dims broadcast: ``[L, H, F]`` statistics with ``[L, F]`` frequencies fold all layers at once.)
        pairing: ``"half"`` or ``"interleaved"``. offsets: ``[O]`` future offsets. scale: attention scaling s.
        use_trig / use_norm / mlr: ablations (no S_trig, no S_norm, S_norm without the (1 - R) weight).
    Returns:
        The folded query on ``q_mean``'s device, vectors shaped like ``q_mean``.
    """
    qm = q_mean.to(torch.complex64)
    weights = offset_weights(round_start, omega, offsets).to(torch.complex64).to(qm.device).unsqueeze(-2)
    u = qm * weights if use_trig else qm * 0
    w = q_abs.float() - (qm.abs() if mlr else 0.0) if use_norm else q_abs.float() * 0
    return FoldedQuery(u.real.contiguous(), u.imag.contiguous(), w.contiguous(), float(scale), pairing)


def score_postrope(keys_rot: torch.Tensor, folded: FoldedQuery, q_pass: torch.Tensor | None = None) -> torch.Tensor:
    """Same score as :func:`naive_score_prerope`, from rotated keys and without key positions (§1.8).

    ``Re(q̄ conj(k_rot) e^{iωt})`` averaged over t = round_start + δ equals ``Re(conj(k_rot) · q̄ W)``; rotated keys
    carry the factor s once, so multiplying by s reproduces the paper's s² weighting: the score is
    ``s·(Re(conj(k) u) + |k|·w)`` per query head. The one formula of this reference and of the CPU body of
    ``triattn::score_keys``; the Triton kernel computes it on CUDA.

    The pass-through term ``q̄_pass · k_pass`` is the same in both forms (those dims are not rotated or scaled).

    Args:
        keys_rot: post-RoPE keys as cached ``[B, Hkv, N, D]`` (any float dtype); the first 2F dims rotate.
        folded: the round's query vectors (:func:`fold_query_stats`); moved to the keys' device if elsewhere.
        q_pass: mean of the pass-through query dims ``[H, D - 2F]`` (``None`` or empty: no term).
    Returns:
        ``[B, H, N]`` float32 scores.
    """
    B, Hkv, N, _ = keys_rot.shape
    folded = folded.to(keys_rot.device)
    H, F = folded.u_re.shape
    k_re, k_im = band_parts(keys_rot.float(), folded.pairing, 2 * F)  # [B, Hkv, N, F]
    k_abs = torch.sqrt(k_re * k_re + k_im * k_im)
    u_re, u_im, w = (t.float().view(Hkv, H // Hkv, F) for t in (folded.u_re, folded.u_im, folded.w))
    # Re(conj(k) u) = k_re u_re + k_im u_im: one real matmul over the bands
    score = (torch.einsum("bhnf,hgf->bhgn", k_re, u_re) + torch.einsum("bhnf,hgf->bhgn", k_im, u_im)
             + torch.einsum("bhnf,hgf->bhgn", k_abs, w))
    score = (score * folded.scale).reshape(B, H, N)
    return score if q_pass is None else score + score_pass_through(keys_rot, q_pass)


def score_pass_through(keys: torch.Tensor, q_pass: torch.Tensor) -> torch.Tensor:
    """The position-independent term ``q̄_pass · k_pass`` of the pass-through (non-rotary) dims, the last P dims.

    Args:
        keys: keys ``[B, Hkv, N, D]`` (pre- or post-RoPE: these dims are not rotated). q_pass: ``[H, P]``.
    Returns:
        ``[B, H, N]`` float32 (zeros when P = 0).
    """
    B, Hkv, N, _ = keys.shape
    H, P = q_pass.shape
    if P == 0:
        return keys.new_zeros(B, H, N, dtype=torch.float32)
    k_pass = keys[..., keys.shape[-1] - P :].float()  # [B, Hkv, N, P]
    q = q_pass.float().to(keys.device).view(Hkv, H // Hkv, P)
    return torch.einsum("bhnd,hgd->bhgn", k_pass, q).reshape(B, H, N)


def fold_latent_query(q_pass: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """MLA's folded query centre ``W_UK,hᵀ q̄_nope,h`` ``[H, R]`` from ``q_pass`` ``[H, P]`` and the key up-projection
    ``projection`` ``[H, R, P]`` (``k_nope,h = Σ_r c_r projection[h, r]``): then ``q̄_nope · k_nope = fold · c``."""
    return torch.einsum("hrp,hp->hr", projection.to(q_pass.device, torch.float64), q_pass.to(torch.float64))


def zscore(scores: torch.Tensor, candidates: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-row z-score over the last dim (population std, clamped at ``eps``), statistics over ``candidates`` only."""
    if candidates is None:
        candidates = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
    mask = candidates.to(scores.dtype)
    n = mask.sum().clamp_min(1)
    mean = (scores * mask).sum(-1, keepdim=True) / n
    var = (((scores - mean) * mask) ** 2).sum(-1, keepdim=True) / n
    return (scores - mean) / var.sqrt().clamp_min(eps)


def aggregate_scores(
    scores: torch.Tensor,
    num_kv_heads: int,
    candidates: torch.Tensor | None = None,
    per_layer: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """z-score per (layer, query head), max over each GQA group, mean over layers (§1.6).

    Args:
        scores: ``[L, B, H, N]``. candidates: ``[N]`` bool, the keys that compete (statistics over these only).
        per_layer: keep one set per (layer, KV head) instead of sharing it across layers.
        noise: optional tie-break noise broadcastable to ``[L, B, H, N]`` added after the z-score.
    Returns:
        ``[B, Hkv, N]`` (``[L, B, Hkv, N]`` when ``per_layer``).
    """
    L, B, H, N = scores.shape
    z = zscore(scores, candidates)
    if noise is not None:
        z = z + noise
    z = z.view(L, B, num_kv_heads, H // num_kv_heads, N).amax(3)
    return z if per_layer else z.mean(0)


def select_keep(aggregated: torch.Tensor, num_protected: int, keep: int) -> torch.Tensor:
    """Slots to keep: the protected prefix ``[0, num_protected)`` plus the top ``keep - num_protected`` of the rest.

    Args:
        aggregated: ``[..., N]`` aggregated scores.
    Returns:
        ``[..., keep]`` int64 slot indices in increasing order (so kept tokens stay in temporal order).
    """
    n_top = keep - num_protected
    if n_top < 0:
        raise ValueError(f"cannot keep {keep} slots with {num_protected} protected prompt tokens")
    top = aggregated[..., num_protected:].topk(n_top, dim=-1).indices + num_protected
    prefix = torch.arange(num_protected, device=aggregated.device).expand(*aggregated.shape[:-1], num_protected)
    return torch.cat([prefix, top.sort(-1).values], dim=-1)
