"""Triton TriAttention key scoring: the post-RoPE score of :func:`naive.score_postrope` in one pass over the keys.

Layers, bottom up (STYLE.md §4):

* :func:`_score_keys_fwd_kernel` — one program per (batch * KV head, block of ``BLOCK_N`` keys). It reads the key
  block once, splits it into rotary bands (``half`` or ``interleaved`` pairing), and for every query head of the GQA
  group writes ``scale * sum_f (k_re u_re + k_im u_im + w |k|)`` in fp32.
* :func:`score_keys_fwd` — host launcher (``wrap_triton(kernel)[grid](...)``), traceable: ``torch.empty`` + shape grid.
* ``triattn::score_keys`` — ``triton_op`` on tensors (the fields of a :class:`naive.FoldedQuery`) whose body launches
  the kernel for CUDA tensors (Inductor lowers it as a user-defined Triton kernel) and otherwise runs
  :func:`naive.score_postrope` (Inductor fuses it on CPU).
* :func:`score_keys` — public entry point, ``(keys, folded)`` like :func:`naive.score_postrope` (the folded query from
  :func:`naive.fold_query_stats`): calls the op.
* :func:`score_keys_triton_eager` — same, but launches the raw kernel with no op and no compile, for tests (CPU
  tensors work under ``TRITON_INTERPRET=1``).

Entry point: :func:`score_keys`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from triattn_compile.kernels.scoring.naive import PAIRINGS, FoldedQuery, score_postrope

__all__ = ["score_keys", "score_keys_fwd", "score_keys_triton_eager"]


@triton.jit(do_not_specialize=["N"])
def _score_keys_fwd_kernel(
    k_ptr,  # [B, Hkv, N, D] any float dtype, any strides
    u_re_ptr,  # [H, F] fp32
    u_im_ptr,  # [H, F] fp32
    w_ptr,  # [H, F] fp32
    out_ptr,  # [B, H, N] fp32
    scale,
    N,
    F,
    G,
    Hkv,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_urh,
    stride_urf,
    stride_uih,
    stride_uif,
    stride_wh,
    stride_wf,
    stride_ob,
    stride_oh,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: b * stride_kb can pass 2**31 on long caches
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    scale = tl.cast(scale, tl.float32)  # Inductor may pass python floats as fp64

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, BLOCK_F)
    mask_n = offs_n < N
    mask_f = offs_f < F
    k_base = k_ptr + b * stride_kb + hk * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn

    # -- load the key block once, split into rotary bands --------------------------------------------------
    if INTERLEAVED:
        # band f = (x[2f], x[2f+1]): read whole rows, then de-interleave in registers
        offs_d = tl.arange(0, 2 * BLOCK_F)
        mask_kd = mask_n[:, None] & (offs_d[None, :] < 2 * F)
        k = tl.load(k_base + offs_d[None, :] * stride_kd, mask=mask_kd, other=0.0).to(tl.float32)
        k_re, k_im = tl.split(tl.reshape(k, (BLOCK_N, BLOCK_F, 2)))
    else:
        # band f = (x[f], x[f+F]): two contiguous half-rows
        mask_kf = mask_n[:, None] & mask_f[None, :]
        k_re = tl.load(k_base + offs_f[None, :] * stride_kd, mask=mask_kf, other=0.0).to(tl.float32)
        k_im = tl.load(k_base + (offs_f[None, :] + F) * stride_kd, mask=mask_kf, other=0.0).to(tl.float32)
    k_abs = tl.sqrt(k_re * k_re + k_im * k_im)  # [BLOCK_N, BLOCK_F]

    # -- score for every query head of the GQA group ---------------------------------------------------------
    out_base = out_ptr + b * stride_ob + offs_n.to(tl.int64) * stride_on
    for g in range(G):
        h = hk * G + g
        u_re = tl.load(u_re_ptr + h * stride_urh + offs_f * stride_urf, mask=mask_f, other=0.0)
        u_im = tl.load(u_im_ptr + h * stride_uih + offs_f * stride_uif, mask=mask_f, other=0.0)
        w = tl.load(w_ptr + h * stride_wh + offs_f * stride_wf, mask=mask_f, other=0.0)
        s = tl.sum(k_re * u_re[None, :] + k_im * u_im[None, :] + k_abs * w[None, :], axis=1)
        tl.store(out_base + h * stride_oh, s * scale, mask=mask_n)


def _is_interpreted() -> bool:
    """Whether ``@triton.jit`` produced an interpreter function (``TRITON_INTERPRET=1`` at import time)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_score_keys_fwd_kernel, InterpretedFunction)


def _block_n(head_dim: int) -> int:
    # keep the three fp32 [BLOCK_N, F] tiles (re, im, |k|) at ~12K elements per program
    return 64 if head_dim <= 128 else 32


def _check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown rotary pairing {pairing!r}; expected one of {PAIRINGS}")


def score_keys_fwd(keys: torch.Tensor, folded: FoldedQuery) -> torch.Tensor:
    """Launch :func:`_score_keys_fwd_kernel`.

    Args:
        keys: post-RoPE keys ``[B, Hkv, N, D]`` (fp32/bf16/fp16, any strides).
        folded: fp32 ``[H, F]`` vectors on the keys' device (F = D / 2, H = Hkv * G), scale and pairing.
    Returns:
        ``[B, H, N]`` float32 scores.
    """
    u_re, u_im, w, pairing = folded.u_re, folded.u_im, folded.w, folded.pairing
    _check_pairing(pairing)
    B, Hkv, N, D = keys.shape
    H, F = u_re.shape
    torch._check(D == 2 * F, lambda: f"head_dim {D} != 2 * bands {F}")
    torch._check(H % Hkv == 0, lambda: f"{H} query heads do not split into {Hkv} KV heads")
    out = torch.empty(B, H, N, dtype=torch.float32, device=keys.device)
    if out.numel() == 0:
        return out
    block_n = _block_n(D)
    grid = (triton.cdiv(N, block_n), B * Hkv)
    wrap_triton(_score_keys_fwd_kernel)[grid](
        keys, u_re, u_im, w, out,
        float(folded.scale), N, F, H // Hkv, Hkv,
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        u_re.stride(0), u_re.stride(1),
        u_im.stride(0), u_im.stride(1),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=block_n,
        BLOCK_F=triton.next_power_of_2(F),
        INTERLEAVED=pairing == "interleaved",
    )  # fmt: skip
    return out


@triton_op("triattn::score_keys", mutates_args=())
def _score_keys_op(
    keys: torch.Tensor, u_re: torch.Tensor, u_im: torch.Tensor, w: torch.Tensor, scale: float, pairing: str
) -> torch.Tensor:
    """``[B, Hkv, N, D]`` keys, fp32 ``[H, F]`` u_re/u_im/w -> fp32 ``[B, H, N]`` scores (Triton on CUDA)."""
    _check_pairing(pairing)
    folded = FoldedQuery(u_re, u_im, w, scale, pairing)
    return score_keys_fwd(keys, folded) if keys.is_cuda else score_postrope(keys, folded)


def score_keys(keys_rot: torch.Tensor, folded: FoldedQuery) -> torch.Tensor:
    """Post-RoPE TriAttention key scores via ``triattn::score_keys``; same contract as ``naive.score_postrope``
    (without its pass-through term).

    Args:
        keys_rot: post-RoPE keys as cached ``[B, Hkv, N, D]`` (fp32/bf16/fp16, any strides), D = 2F.
        folded: the round's query vectors (``naive.fold_query_stats``); moved to the keys' device if elsewhere.
    Returns:
        ``[B, H, N]`` float32 scores (higher = more likely to be attended).

    Examples::

        >>> from triattn_compile.kernels.scoring.naive import fold_query_stats, geometric_offsets
        >>> F = 32
        >>> keys = torch.randn(1, 2, 63, 2 * F)
        >>> q_mean = torch.randn(4, F, dtype=torch.complex64)
        >>> omega = 10000.0 ** (-torch.arange(F) / F)
        >>> s = score_keys(keys, fold_query_stats(100, q_mean, q_mean.abs() + 0.1, omega, "half", geometric_offsets()))
        >>> s.shape
        torch.Size([1, 4, 63])
    """
    f = folded.to(keys_rot.device)
    return torch.ops.triattn.score_keys(keys_rot, f.u_re, f.u_im, f.w, f.scale, f.pairing)


def score_keys_triton_eager(keys_rot: torch.Tensor, folded: FoldedQuery) -> torch.Tensor:
    """:func:`score_keys` through the raw Triton kernel, no op and no ``torch.compile`` (for tests and debugging).

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before ``triton`` is first imported in the
    process (Triton fixes interpretation when ``@triton.jit`` runs, for its own ``tl.sum`` too).
    """
    if not keys_rot.is_cuda and not _is_interpreted():
        raise RuntimeError("score_keys_triton_eager: CPU tensors need TRITON_INTERPRET=1 before triton is imported")
    return score_keys_fwd(keys_rot, folded.to(keys_rot.device))
