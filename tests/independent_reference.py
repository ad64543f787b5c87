"""Independent test oracle for TriAttention key selection (HF semantics).

Written directly from /work/shared/TRIATTENTION.md sections 1.1-1.9, in the
paper's pre-RoPE form: invert RoPE per key with its absolute position, loop
over the 17 geometric offsets and evaluate the cosines explicitly.  Everything
is float64 and there is no tie-break noise (so exact score ties are resolved
arbitrarily by torch.topk; tests should avoid them).  It imports nothing from
triattn_compile.

Beyond the paper's fully rotary rotate-half heads (1.1), a head may rotate only
some of its dims, with either pairing, as the models do:

* pairing: "half" pairs dim f with f + F of the rotated dims (rotate_half,
  Llama); "interleaved" pairs 2f with 2f + 1 (rotate_every_two, GPT-J, GLM,
  view_as_complex).  Either way band f turns by e^{i w_f p} at position p.
* partial rotary: dims [start, start + width) rotate (leading: GPT-NeoX, Phi,
  GLM; trailing: MLA's q_pe / k_pe); the other dims pass through unrotated,
  NoPE layers have width 0.  q(t).k(p) of the pass-through dims does not
  depend on t - p, so its expectation over queries is E[q_pass] . k_pass
  exactly (linear) and the mean over offsets leaves it unchanged: the score
  adds it (unscaled, no norm term: S_norm is the per-band heuristic of 1.4).
* a key per query head (MLA: k_nope differs per head, k_pe is shared): the
  query heads of a KV group read key head h // (H / Hk) for Hk key heads;
  Hk = 1 is plain GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OFFSETS = [float(2 ** i) for i in range(17)]  # 1, 2, 4, ..., 65536 (1.5)


def rotary_bands(x: torch.Tensor, start: int, width: int, pairing: str) -> torch.Tensor:
    """The rotated dims [start, start + width) of x[..., D] as complex bands [..., width / 2]."""
    r = x[..., start : start + width]
    if pairing == "half":  # (x[f], x[f + F])
        re, im = r[..., : width // 2], r[..., width // 2 :]
    elif pairing == "interleaved":  # (x[2f], x[2f + 1])
        re, im = r[..., 0::2], r[..., 1::2]
    else:
        raise ValueError(pairing)
    return torch.complex(re.to(torch.float64), im.to(torch.float64))


def pass_dims(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """The dims of x[..., D] outside [start, start + width), in their order."""
    return torch.cat([x[..., :start], x[..., start + width :]], dim=-1).to(torch.float64)


def prerope_scores(
    k_bands: torch.Tensor,
    k_pass: torch.Tensor,
    positions: torch.Tensor,
    round_start: int,
    q_mean: torch.Tensor,
    q_abs: torch.Tensor,
    q_pass: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> torch.Tensor:
    """Score S~ (1.3-1.5, plus the pass-through term) of pre-RoPE keys, [B, H, n] float64.

    k_bands: [B, Hk, n, F] complex pre-RoPE key bands; k_pass: [B, Hk, n, P].
    positions: [n] absolute positions; round_start: position of the next token.
    q_mean: [H, F] complex E[q_f]; q_abs: [H, F] E|q_f|; q_pass: [H, P] E[q_pass].
    Query head h reads key head h // (H // Hk).
    """
    f64 = torch.float64
    H = q_mean.shape[0]
    Hk = k_bands.shape[1]
    assert H % Hk == 0 and q_abs.shape == q_mean.shape and q_pass.shape == (H, k_pass.shape[-1])
    k_c = k_bands.repeat_interleave(H // Hk, dim=1)  # [B, H, n, F]
    k_abs, k_arg = k_c.abs(), torch.angle(k_c)
    omega = inv_freq.to(f64)  # [F]  (1.1)
    s_f2 = float(attention_scaling) ** 2  # freq_scale_f^2 = attention_scaling^2 (1.1)
    qbar = q_mean.to(torch.complex128)
    qbar_abs = qbar.abs()[None, :, None, :]  # [1, H, 1, F]
    qbar_arg = torch.angle(qbar)[None, :, None, :]
    qabs = q_abs.to(f64)[None, :, None, :]
    amp = qbar_abs * k_abs  # |qbar_f| |k_f|  (1.3)
    phi = qbar_arg - k_arg  # arg(qbar_f) - arg(k_f)  (1.3)
    # S_norm = sum_f (E|q_f| - |E q_f|) |k_f| * s_f^2, offset independent (1.4)
    s_norm = (s_f2 * (qabs - qbar_abs) * k_abs).sum(-1)  # [B, H, n]
    delta0 = float(round_start) - positions.to(f64)  # Delta0 = round_start - p  (1.5)
    acc = torch.zeros_like(s_norm)
    for d in OFFSETS:
        phase = omega * (delta0[:, None] + d) + phi  # [B, H, n, F]
        acc = acc + (s_f2 * amp * torch.cos(phase)).sum(-1) + s_norm  # S = S_trig + S_norm, Eq. 6 (1.3, 1.4)
    score = acc / len(OFFSETS)  # arithmetic mean over offsets (1.5)
    k_p = k_pass.to(f64).repeat_interleave(H // Hk, dim=1)  # [B, H, n, P]
    return score + (k_p * q_pass.to(f64)[None, :, None, :]).sum(-1)


@dataclass
class OracleLayer:
    """One layer's cached keys and the query statistics of one KV group's query heads.

    keys: [B, Hk, N, D] post-RoPE keys as cached; rotary_start / rotary_dim: the rotated dims; pairing: how the
    rotated key pairs them; inv_freq: [F] w_f; attention_scaling: magnitude s of the cos/sin tables;
    q_mean [H, F] complex, q_abs [H, F], q_pass [H, D - rotary_dim]: pre-RoPE query statistics, q_pass over the
    query dims outside the rotated ones, in their order.
    """

    keys: torch.Tensor
    rotary_start: int
    rotary_dim: int
    pairing: str
    inv_freq: torch.Tensor
    attention_scaling: float
    q_mean: torch.Tensor
    q_abs: torch.Tensor
    q_pass: torch.Tensor


def oracle_keep_set(
    layers: list[OracleLayer],
    positions: torch.Tensor,
    round_start: int,
    num_protected: int,
    budget: int,
    prefer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept slot indices [B, budget] (sorted) of one KV group, shared by ``layers`` (1.6, 1.7, 1.9).

    positions: [N] absolute position of each slot; the first num_protected slots are the prompt: always kept,
    never scored; the rest compete for budget - num_protected.
    prefer: [B, budget] sorted slot indices (another implementation's choice), returned instead of ``topk``'s when
    it is an equally valid top set: it differs only among candidates whose aggregated scores are exactly equal
    (identical keys of a NoPE layer tie at any position, and which of them ``topk`` keeps is arbitrary).
    """
    B, _, N, _ = layers[0].keys.shape
    assert 0 <= num_protected <= budget <= N and positions.shape == (N,)
    P = num_protected
    keep_n = budget - P  # decode tokens compete for B - prefill_len (1.7, 1.9)
    device = layers[0].keys.device
    if keep_n == N - P:  # nothing to evict
        return torch.arange(N, device=device).expand(B, N).clone()
    pos = positions.to(device, torch.float64)[P:]  # candidate (decode) slots only (1.7)
    per_layer = []
    for layer in layers:
        k = layer.keys[:, :, P:].to(torch.float64)  # [B, Hk, n, D]
        s = float(layer.attention_scaling)
        # HF RoPE in complex form: k_post_f = s k_f e^{i w_f p}; invert it with the key's absolute position and
        # divide by s (1.1, 1.3 notes).
        angle = pos[:, None] * layer.inv_freq.to(device, torch.float64)  # [n, F]
        rot = torch.polar(torch.ones_like(angle), -angle)
        k_c = rotary_bands(k, layer.rotary_start, layer.rotary_dim, layer.pairing) * rot / s  # [B, Hk, n, F]
        score = prerope_scores(k_c, pass_dims(k, layer.rotary_start, layer.rotary_dim), pos, round_start,
                               layer.q_mean, layer.q_abs, layer.q_pass, layer.inv_freq, s)  # [B, H, n]
        # z-score each (layer, query head) row over the candidate keys, population std clamped at 1e-6 (1.6 step 2)
        mu = score.mean(-1, keepdim=True)
        sd = score.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6)
        per_layer.append(((score - mu) / sd).amax(dim=1))  # max over the group's query heads (1.6 step 4)
    agg = torch.stack(per_layer, 0).mean(0)  # mean over layers -> [B, n] (1.6)
    top = torch.topk(agg, keep_n, dim=-1).indices + P  # back to slot indices
    if prefer is not None and _equally_top(agg, prefer[:, P:] - P, keep_n):
        top = prefer[:, P:]
    protected = torch.arange(P, device=device).expand(B, P)
    return torch.cat([protected, top], dim=-1).sort(dim=-1).values  # prefill U topk (1.9)


def _equally_top(agg: torch.Tensor, chosen: torch.Tensor, keep_n: int) -> bool:
    """Whether ``chosen`` [B, keep_n] (distinct candidate indices) is a top-``keep_n`` set of ``agg`` [B, n]: no
    candidate left out scores above any chosen one (exact comparison: only exact ties may be broken either way)."""
    if chosen.shape != (agg.shape[0], keep_n):
        return False
    if keep_n == 0:  # the protected prompt fills the budget
        return True
    if chosen.min() < 0 or chosen.max() >= agg.shape[-1]:
        return False
    picked = torch.zeros_like(agg, dtype=torch.bool).scatter(-1, chosen, True)
    if not bool((picked.sum(-1) == keep_n).all()):
        return False
    lowest_in = agg.masked_fill(~picked, torch.inf).amin(-1)
    highest_out = agg.masked_fill(picked, -torch.inf).amax(-1)
    return bool((lowest_in >= highest_out).all())


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
    """Return [B, Hkv, budget] int64 kept slot indices, sorted ascending: the paper's case (fully rotary,
    rotate-half, one key per KV head, one keep set per KV head shared by all layers).

    keys_post[l]: [B, Hkv, N, D] post-RoPE keys of layer l (HF rotate-half,
        cos/sin = attention_scaling * cos/sin(pos * inv_freq)).
    positions: [N] absolute position of each slot.
    round_start: absolute position of the next token.
    q_mean_real / q_mean_imag / q_abs_mean: [L, H, F] pre-RoPE query stats.
    num_protected: first slots are the prompt: always kept, never scored (1.7).
    budget: total kept slots per KV head, protected included (1.7).
    """
    L = len(keys_post)
    B, Hkv, N, D = keys_post[0].shape
    H = q_mean_real.shape[1]
    G = H // Hkv  # query heads per KV head; kv(h) = h // G  (1.6)
    assert q_mean_real.shape == q_mean_imag.shape == q_abs_mean.shape == (L, H, D // 2)
    assert H == G * Hkv and inv_freq.shape == (D // 2,) and positions.shape == (N,)
    q_mean = torch.complex(q_mean_real.double(), q_mean_imag.double())
    out = []
    for j in range(Hkv):
        heads = slice(j * G, (j + 1) * G)
        layers = [OracleLayer(keys_post[l][:, j : j + 1], 0, D, "half", inv_freq.double(), attention_scaling,
                              q_mean[l, heads], q_abs_mean[l, heads].double(),
                              torch.zeros(G, 0, dtype=torch.float64)) for l in range(L)]  # noqa: E741
        out.append(oracle_keep_set(layers, positions, round_start, num_protected, budget))
    return torch.stack(out, dim=1)
