"""Independent test oracle for TriAttention key selection (HF semantics).

Written directly from /work/shared/TRIATTENTION.md sections 1.1-1.9, in the
paper's pre-RoPE form: invert RoPE per key with its absolute position, loop
over the 17 geometric offsets and evaluate the cosines explicitly.  Everything
is float64 and there is no tie-break noise (so exact score ties are resolved
arbitrarily by torch.topk; tests should avoid them).
"""

from __future__ import annotations

import torch


def independent_keep_sets(
    keys_post: list[torch.Tensor],
    positions: torch.Tensor,
    round_start: int,
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    num_protected: int,
    budget: int,
) -> torch.Tensor:
    """Return [B, Hkv, budget] int64 kept slot indices, sorted ascending.

    keys_post[l]: [B, Hkv, N, D] post-RoPE keys of layer l (HF rotate-half,
        cos/sin = attention_scaling * cos/sin(pos * inv_freq)).
    positions: [N] absolute position of each slot.
    round_start: absolute position of the next token.
    q_mean_real / q_mean_imag / q_abs_mean: [L, H, F] pre-RoPE query stats.
    num_protected: first slots are the prompt: always kept, never scored (1.7).
    budget: total kept slots per KV head, protected included (1.7).
    """
    f64 = torch.float64
    L = len(keys_post)
    B, Hkv, N, D = keys_post[0].shape
    F = D // 2
    H = q_mean_real.shape[1]
    G = H // Hkv  # query heads per KV head; kv(h) = h // G  (1.6)
    assert q_mean_real.shape == q_mean_imag.shape == q_abs_mean.shape == (L, H, F)
    assert H == G * Hkv and inv_freq.shape == (F,) and positions.shape == (N,)
    assert 0 <= num_protected <= budget <= N

    device = keys_post[0].device
    P = num_protected
    keep_n = budget - P  # decode tokens compete for B - prefill_len (1.7, 1.9)
    protected = torch.arange(P, device=device, dtype=torch.long).expand(B, Hkv, P)
    if keep_n == N - P:  # nothing to evict
        return torch.arange(N, device=device, dtype=torch.long).expand(B, Hkv, N).clone()

    omega = inv_freq.to(device, f64)  # [F]  (1.1)
    s = float(attention_scaling)
    s_f2 = s * s  # freq_scale_f^2 = attention_scaling^2 for every band (1.1)
    pos = positions.to(device, f64)[P:]  # candidate (decode) slots only (1.7)
    offsets = [float(2 ** i) for i in range(17)]  # 1, 2, 4, ..., 65536 (1.5)

    per_layer = []  # each [B, Hkv, n]: max over the GQA group of z-scores
    for l in range(L):  # noqa: E741
        k = keys_post[l].to(f64)[:, :, P:, :]  # [B, Hkv, n, D]
        # Half pairing (1.1): band f is x[f] + i*x[f+F].  HF RoPE in complex
        # form is k_post_f = s * k_f * e^{i w_f p}; invert it with the key's
        # absolute position p and divide by s (1.1, 1.3 notes).
        k_post_c = torch.complex(k[..., :F], k[..., F:])
        rot = torch.polar(torch.ones_like(pos[:, None] * omega), -pos[:, None] * omega)  # [n, F]
        k_c = k_post_c * rot / s  # pre-RoPE complex key [B, Hkv, n, F]
        # Expand KV heads to query heads: query head h reads KV head h // G (1.6).
        k_c = k_c.repeat_interleave(G, dim=1)  # [B, H, n, F]
        k_abs = k_c.abs()
        k_arg = torch.angle(k_c)

        qbar = torch.complex(q_mean_real[l].to(device, f64), q_mean_imag[l].to(device, f64))  # [H, F]
        qbar_abs = qbar.abs()[None, :, None, :]  # [1, H, 1, F]
        qbar_arg = torch.angle(qbar)[None, :, None, :]
        qabs = q_abs_mean[l].to(device, f64)[None, :, None, :]

        amp = qbar_abs * k_abs  # |qbar_f| |k_f|  (1.3)
        phi = qbar_arg - k_arg  # arg(qbar_f) - arg(k_f)  (1.3)
        # S_norm = sum_f (E|q_f| - |E q_f|) |k_f| * s_f^2, offset independent (1.4)
        s_norm = (s_f2 * (qabs - qbar_abs) * k_abs).sum(-1)  # [B, H, n]

        delta0 = float(round_start) - pos  # [n]  Delta0 = round_start - p  (1.5)
        acc = torch.zeros_like(s_norm)
        for d in offsets:
            phase = omega * (delta0[:, None] + d) + phi  # [B, H, n, F]
            s_trig = (s_f2 * amp * torch.cos(phase)).sum(-1)  # Eq. 6 (1.3)
            acc = acc + s_trig + s_norm  # S = S_trig + S_norm, no weight (1.4)
        score = acc / len(offsets)  # arithmetic mean over offsets (1.5)

        # z-score each (layer, query head) row over the candidate keys,
        # population std clamped at 1e-6 (1.6 step 2).
        mu = score.mean(-1, keepdim=True)
        sd = score.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6)
        z = (score - mu) / sd  # [B, H, n]
        # max over the G query heads sharing a KV head, per layer (1.6 step 4)
        per_layer.append(z.view(B, Hkv, G, -1).amax(dim=2))

    agg = torch.stack(per_layer, 0).mean(0)  # mean over layers -> [B, Hkv, n] (1.6)
    top = torch.topk(agg, keep_n, dim=-1).indices + P  # back to slot indices
    keep = torch.cat([protected, top], dim=-1)  # prefill U topk (1.9)
    return keep.sort(dim=-1).values
