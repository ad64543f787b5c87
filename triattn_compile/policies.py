"""Which tokens a compaction keeps: TriAttention, and the baselines it is compared with, one small class each.

A policy only scores the occupied slots. ``kernels/compact.py`` does the rest identically for every policy: the
protected prompt and the policy's recent window are always kept, the top ``budget`` per KV head (per layer, or
shared by all layers) survive, and every layer is compacted in place. A policy that needs live queries says so
(``query_window``: the pass records the last W post-RoPE queries per layer; ``accumulate_attention``: the pass adds
each step's attention probabilities per slot; ``distant_attention`` = d > 0: the pass also sums, into a second
accumulator, the share paid by queries at least d positions after the key). Adding a policy is adding a class and
a line in :data:`POLICIES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triattn_compile.config import MAX_OFFSET, NOISE
from triattn_compile.kernels.scoring.naive import (
    FoldedQuery,
    aggregate_scores,
    fold_query_stats,
    geometric_offsets,
    score_pass_through,
    zscore,
)
from triattn_compile.kernels.scoring.triton_kernel import score_keys


@dataclass
class CompactionInputs:
    """What a policy may look at when the cache is full (``N`` occupied slots: the protected prompt first; the HF
    cache keeps them in temporal order, vLLM's worker in the order hole filling leaves them, so order-sensitive
    scores read ``positions``)."""

    keys: list[torch.Tensor] | torch.Tensor  # per layer: occupied post-RoPE keys [B, Hkv, N, D], [rotary ; pass]
    # (MLA: [k_pe ; c_kv]); or all layers stacked, [L, B, Hkv, N, D]
    positions: torch.Tensor  # [L, B, Hkv, N] absolute positions
    next_position: int  # absolute position of the next token
    num_protected: int  # leading slots that are always kept (the prompt, when protected)
    round: int  # compaction rounds done before this one
    q_mean: torch.Tensor  # [L, H, F] complex: calibrated query centres
    q_abs: torch.Tensor  # [L, H, F]: calibrated E|q_f|
    omega: torch.Tensor  # [L, F] rotary frequencies
    pairing: str  # "half" | "interleaved"
    scale: float  # attention scaling of the rotary embedding
    queries: torch.Tensor | None = None  # [L, B, H, W, D] last W post-RoPE queries (query_window > 0)
    attention: torch.Tensor | None = None  # [L, B, Hkv, N] accumulated attention (accumulate_attention)
    distant_attention: torch.Tensor | None = None  # [L, B, Hkv, N] its share from queries >= d after the key
    q_pass: torch.Tensor | list | None = None  # [L, H, P]: mean of the pass-through query dims (MLA: folded [H, R])
    values: list[torch.Tensor] | torch.Tensor | None = None  # per layer: occupied values [B, Hkv, N, Dv] (or stacked)
    budget: int = 0  # slots kept per KV head after this compaction
    layers: list[int] | None = None  # the model's layer index of each entry (HF path; per-layer budgets score the
    # layers of each budget on their own)

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    def candidates(self) -> torch.Tensor:
        """``[N]`` bool: the slots that compete (not protected)."""
        n = self.keys[0].shape[2]
        return torch.arange(n, device=self.keys[0].device) >= self.num_protected


def layer_scores(inputs: CompactionInputs, max_offset: int = MAX_OFFSET, **ablations: bool) -> torch.Tensor:
    """TriAttention's raw score of every occupied slot for every query head, before the z-score: ``[L, B, H, N]``.

    All layers in one :func:`score_keys` call when their keys share a shape (the usual case): the layers are folded
    into the head dimension, query head ``l·H + h`` reading KV head ``l·Hkv + h // G``, so one launch (one fused CPU
    expression) scores the whole model; otherwise layer by layer. ``ablations``: ``use_trig``, ``use_norm``, ``mlr``.
    """
    offsets = geometric_offsets(max_offset)
    rotary = 2 * inputs.q_mean.shape[-1]
    keys, q_pass = inputs.keys, inputs.q_pass
    if isinstance(q_pass, list) and len({q.shape for q in q_pass}) == 1:
        q_pass = torch.stack(q_pass)
    if len({k.shape for k in keys}) > 1 or isinstance(q_pass, list):
        return torch.stack([
            score_keys(k[..., :rotary], fold_query_stats(inputs.next_position, inputs.q_mean[i], inputs.q_abs[i],
                                                         inputs.omega[i], inputs.pairing, offsets, inputs.scale,
                                                         **ablations))
            + (0 if q_pass is None else score_pass_through(k, q_pass[i]))  # partial rotary, naive.py
            for i, k in enumerate(keys)
        ])
    stacked = keys if isinstance(keys, torch.Tensor) else torch.stack(keys)  # [L, B, Hkv, N, D]
    L, B, Hkv, N, D = stacked.shape
    flat = stacked.transpose(0, 1).reshape(B, L * Hkv, N, D)
    folded = fold_query_stats(inputs.next_position, inputs.q_mean, inputs.q_abs, inputs.omega, inputs.pairing,
                              offsets, inputs.scale, **ablations)
    heads = L * inputs.q_mean.shape[1]
    folded = FoldedQuery(*(t.reshape(heads, t.shape[-1]) for t in (folded.u_re, folded.u_im, folded.w)),
                         folded.scale, folded.pairing)
    raw = score_keys(flat[..., :rotary], folded)
    if q_pass is not None:
        raw = raw + score_pass_through(flat, q_pass.reshape(heads, q_pass.shape[-1]))
    return raw.view(B, L, -1, N).transpose(0, 1)


def row_noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform noise shaped like ``like`` ``[L, B, ...]``, the same for every row ``b`` (what that row draws when
    compacted alone, so compacting rows together changes nothing)."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    one = torch.rand((like.shape[0], 1, *like.shape[2:]), generator=gen, device=like.device, dtype=like.dtype)
    return one.expand_as(like)


class Policy:
    """Scores occupied slots; higher is kept. Subclasses set the class attributes they need."""

    name = "policy"
    query_window = 0  # post-RoPE queries to record per layer
    accumulate_attention = False  # per-slot attention mass summed over decode steps
    distant_attention = 0  # d > 0: also the mass from queries at least d positions after the slot (needs the above)
    recent_window = 0  # most recent slots always kept
    reads_values = False  # looks at the cached values (vLLM's worker gathers them only then)

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        """``[L, B, Hkv, N]`` (one keep set per layer) or ``[1, B, Hkv, N]`` (one set shared by all layers)."""
        raise NotImplementedError

    def layer_budgets(self, model, budget: int, layout, floor: int) -> tuple[int, ...] | None:
        """Per-layer budgets of mean (at most) ``budget``, none below ``floor``, planned by the policy for ``model``
        (its discovered ``layout``) when it is optimized; ``None`` (the default): ``budget`` in every layer."""
        return None


@dataclass
class TriAttention(Policy):
    """The paper's score (§1.3–§1.6): trigonometric series + norm term from calibrated query centres, averaged over
    geometric future offsets, z-scored per head, max over the GQA group, mean over layers.

    Args:
        per_layer: one keep set per (layer, KV head) instead of one shared by all layers.
        use_trig / use_norm / mlr: ablations (drop S_trig; drop S_norm; S_norm without the (1 - R) weighting).
        max_offset: largest future offset. noise / seed: tie-break noise on z-scores, reseeded every round.
    """

    per_layer: bool = False
    use_trig: bool = True
    use_norm: bool = True
    mlr: bool = True
    max_offset: int = MAX_OFFSET
    noise: float = NOISE
    seed: int = 0
    name: str = "triattention"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        raw = layer_scores(inputs, max_offset=self.max_offset, use_trig=self.use_trig, use_norm=self.use_norm,
                           mlr=self.mlr)
        jitter = None
        if self.noise > 0:
            jitter = row_noise(raw, self.seed + inputs.round) * self.noise
        agg = aggregate_scores(raw, inputs.num_kv_heads, inputs.candidates(), per_layer=self.per_layer, noise=jitter)
        return agg if self.per_layer else agg[None]


@dataclass
class TriAttentionNoTrig(TriAttention):
    """Ablation "w/o S_trig" (Table 3, ``disable_trig``): the norm term alone."""

    use_trig: bool = False
    name: str = "triattention-no-trig"


@dataclass
class TriAttentionNoNorm(TriAttention):
    """Ablation "w/o S_norm" (trig only; the paper quotes it in the text, the release has no switch for it)."""

    use_norm: bool = False
    name: str = "triattention-no-norm"


@dataclass
class TriAttentionNoMLR(TriAttention):
    """Ablation "w/o R weighting" (``disable_mlr``): S_norm^(0) = Σ_f E|q_f| |k_f| instead of (1 - R_f) E|q_f| |k_f|."""

    mlr: bool = False
    name: str = "triattention-no-mlr"


# -- beyond the paper: variants over TriAttention's scores (docs/quality.md, "Beyond the paper") -------------------
def protect_recent(scores: torch.Tensor, inputs: CompactionInputs, window: int, sinks: int) -> torch.Tensor:
    """``scores`` ``[X, B, Hkv, N]`` with the ``window`` most recent slots and the first ``sinks`` positions of the
    sequence set to +inf (kept whatever their score)."""
    pos = inputs.positions[: scores.shape[0]] if scores.shape[0] == 1 else inputs.positions
    keep = (pos >= inputs.next_position - window) | (pos < sinks)
    return scores.masked_fill(keep, torch.inf)


def layer_zscore(values: torch.Tensor, inputs: CompactionInputs, per_layer: bool) -> torch.Tensor:
    """``values`` ``[L, B, Hkv, N]`` z-scored per layer and KV head over the competing slots, then averaged over
    the layers (``[1, B, Hkv, N]``, like TriAttention's shared score) unless ``per_layer``."""
    z = zscore(values, inputs.candidates())
    return z if per_layer else z.mean(0, keepdim=True)


def value_similarity(values: list[torch.Tensor], per_layer: bool) -> torch.Tensor:
    """Cosine similarity of every pair of cached values, ``[L, B, Hkv, N, N]`` (``per_layer``) or averaged over
    the layers, ``[1, B, Hkv, N, N]``."""
    unit = [F.normalize(v.float(), dim=-1) for v in values]
    if per_layer:
        return torch.stack([u @ u.transpose(-1, -2) for u in unit])
    joint = torch.cat(unit, -1) / math.sqrt(len(unit))  # one matmul: the mean over layers of the cosines
    return (joint @ joint.transpose(-1, -2))[None]


def greedy_diverse(scores: torch.Tensor, similarity: torch.Tensor, keep: int, penalty: float) -> torch.Tensor:
    """Redundancy-penalized greedy selection (maximal marginal relevance) over ``scores`` ``[X, B, Hkv, N]``.

    The slots scored +inf (protected) are taken first; then, ``keep`` times, the slot with the highest
    ``score - penalty * max_{j kept} similarity(slot, j)``. Returns scores whose top ``keep`` are the chosen slots
    (in choice order), so :func:`~triattn_compile.kernels.compact.keep_slots` keeps exactly them.
    """
    n = scores.shape[-1]
    chosen = torch.isinf(scores) & (scores > 0)
    fixed = chosen.float().unsqueeze(-1)
    redundancy = (similarity * fixed.transpose(-1, -2)).amax(-1)  # most similar kept slot, clamped at 0
    base = torch.where(chosen, torch.zeros_like(scores), scores)
    rank = torch.where(chosen, torch.full_like(scores, 2.0 * n), torch.full_like(scores, -torch.inf))
    for step in range(int(keep - chosen.sum(-1).min())):
        gain = (base - penalty * redundancy).masked_fill(chosen, -torch.inf)
        best = gain.argmax(-1, keepdim=True)  # [X, B, Hkv, 1]
        fresh = ~chosen.gather(-1, best)
        rank.scatter_(-1, best, torch.where(fresh, float(n - step), 2.0 * n))
        chosen.scatter_(-1, best, True)
        row = similarity.gather(-2, best.unsqueeze(-1).expand(*best.shape, n)).squeeze(-2)
        redundancy = torch.maximum(redundancy, row)
    return rank


@dataclass
class TriAttentionRecent(TriAttention):
    """(a) TriAttention with a protected recency window and attention sinks: the ``window`` most recent tokens
    (at most half the budget) and the first ``sinks`` positions are always kept; the official vLLM runtime keeps
    128 recent tokens, the paper's HF runs none (TRIATTENTION.md §2)."""

    window: int = 128
    sinks: int = 4
    name: str = "triattention-recent"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        window = min(self.window, inputs.budget // 2)
        return protect_recent(super().scores(inputs), inputs, window, self.sinks)


@dataclass
class TriAttentionDiverse(TriAttention):
    """(b) Redundancy-aware selection on top of TriAttention's scores: greedy, each next slot maximising its
    aggregated z-score minus ``penalty`` times its largest value-space cosine similarity to a slot already kept
    (layer-averaged for a shared keep set), after the recency window and sinks of (a)."""

    penalty: float = 1.0
    window: int = 0
    sinks: int = 0
    name: str = "triattention-diverse"
    reads_values = True

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        scored = protect_recent(super().scores(inputs), inputs, min(self.window, inputs.budget // 2), self.sinks)
        scored = scored.masked_fill(~inputs.candidates(), torch.inf)  # the protected prompt is kept: it covers too
        similarity = value_similarity(inputs.values, self.per_layer)
        return greedy_diverse(scored, similarity, inputs.budget, self.penalty)


@dataclass
class TriAttentionValueNorm(TriAttention):
    """(c) TriAttention's expected logit plus what the token would contribute if attended: ``weight`` times the
    z-scored log value norm (per layer and KV head over the competing slots, averaged over layers like the score),
    after the recency window and sinks of (a)."""

    weight: float = 0.5
    window: int = 0
    sinks: int = 0
    name: str = "triattention-vnorm"
    reads_values = True

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        norms = torch.stack([v.float().norm(dim=-1).clamp_min(1e-6).log() for v in inputs.values])  # [L, B, Hkv, N]
        scored = super().scores(inputs) + self.weight * layer_zscore(norms, inputs, self.per_layer)
        return protect_recent(scored, inputs, min(self.window, inputs.budget // 2), self.sinks)


@dataclass
class TriAttentionObserved(TriAttention):
    """(d) TriAttention's predicted score plus the attention each token has actually received: ``weight`` times the
    z-scored log of its mean attention per query since it entered the cache (accumulated like H2O's, divided by
    its age so that new tokens are not penalised; per layer and KV head, averaged over layers like the score)."""

    weight: float = 0.5
    accumulate_attention = True
    name: str = "triattention-observed"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        age = (inputs.next_position - inputs.positions).clamp_min(1).float()
        received = (inputs.attention / age).clamp_min(1e-12).log()  # [L, B, Hkv, N]
        return super().scores(inputs) + self.weight * layer_zscore(received, inputs, self.per_layer)


@dataclass
class TriAttentionDistinct(TriAttention):
    """(e) TriAttention's score minus ``weight`` times R-KV's key redundancy (:func:`key_redundancy`: a key's mean
    cosine similarity to the other cached keys, the most recent near-duplicate not counted), z-scored per layer and
    KV head and averaged over layers like the score: a token unlike the rest of the cache (a name, a number) is
    favoured over one of many near-copies, which a calibrated query centre cannot tell apart."""

    weight: float = 0.5
    threshold: float = 0.5
    name: str = "triattention-distinct"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        redundancy = torch.stack([key_redundancy(k, self.threshold).log() for k in inputs.keys])  # [L, B, Hkv, N]
        return super().scores(inputs) - self.weight * layer_zscore(redundancy, inputs, self.per_layer)


def window_probabilities(inputs: CompactionInputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of the last ``W`` recorded queries over one layer's cached keys, as the model paid it: causal by
    positions (query ``i`` sits at ``next_position - W + i``), softmax over every slot it saw, ``1/sqrt(D)``.

    Returns:
        probabilities ``[B, Hkv, G, W, N]`` (0 where unseen) and query-to-key distances ``[B, Hkv, 1, W, N]``.
    """
    keys = inputs.keys[layer].float()  # [B, Hkv, N, D]
    q = inputs.queries[layer].float()  # [B, H, W, D]
    B, Hkv, N, D = keys.shape
    window = q.shape[2]
    q = q.view(B, Hkv, q.shape[1] // Hkv, window, D)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys) / math.sqrt(D)  # [B, Hkv, G, W, N]
    query_pos = inputs.next_position - window + torch.arange(window, device=keys.device)
    distance = query_pos[:, None] - inputs.positions[layer][:, :, None, None, :]  # [B, Hkv, 1, W, N]
    probs = logits.masked_fill(distance < 0, -torch.inf).softmax(-1).nan_to_num(0.0)
    return probs, distance


def interval_attention(inputs: CompactionInputs, layer: int) -> torch.Tensor:
    """``[B, Hkv, N]``: the attention the last ``W`` recorded queries paid each cached key of one layer
    (:func:`window_probabilities`), summed over the queries and divided by ``W``, max over each GQA group: with
    ``W`` = the compaction interval, what the queries since the last compaction actually read."""
    probs, _ = window_probabilities(inputs, layer)
    return probs.sum(-2).amax(2) / probs.shape[-2]


def distant_attention(inputs: CompactionInputs, layer: int, min_distance: int) -> torch.Tensor:
    """``[B, Hkv, N]``: the mean attention each cached key of one layer received from the recorded queries at least
    ``min_distance`` positions after it, max over each GQA group; NaN for a key no such query saw (the newest)."""
    probs, distance = window_probabilities(inputs, layer)
    far = (distance >= min_distance).to(probs.dtype)
    count = far.sum(-2)  # [B, Hkv, 1, N]
    mean = (probs * far).sum(-2) / count
    return mean.amax(2)  # NaN stays NaN through amax when every head lacks distant queries


@dataclass
class TriAttentionLive(TriAttention):
    """(f) TriAttention's predicted score plus what the live queries since the last compaction attended to:
    ``weight`` times the z-scored log of :func:`interval_attention` over the last ``query_window`` queries (the
    compaction interval), per layer and KV head, averaged over layers like the score unless ``per_layer``. A large
    weight ranks by the live attention alone. Motivated by ``bench/oracle_bound.py``: the attention the next
    queries will pay is best predicted by the attention the last ones paid."""

    weight: float = 1.0
    query_window: int = 128
    name: str = "triattention-live"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        live = torch.stack([interval_attention(inputs, i) for i in range(len(inputs.keys))])  # [L, B, Hkv, N]
        return super().scores(inputs) + self.weight * layer_zscore(live.clamp_min(1e-12).log(), inputs,
                                                                     self.per_layer)


@dataclass
class TriAttentionPersistent(TriAttention):
    """(g) TriAttention's predicted score plus the attention a token receives from queries far from it:
    ``weight`` times the z-scored log of :func:`distant_attention` (queries at least ``min_distance`` positions
    later, among the last ``query_window``), per layer and KV head, one keep set per layer (``per_layer``; the
    defaults are the settings chosen on the development documents). The newest ``min_distance`` tokens, which no such
    query has seen yet, are kept, at most half the budget of them (at B = 64 all 64 would evict the sinks).
    Motivated by ``bench/oracle_bound.py``: what the whole future attends to is kept mostly for being attended from
    afar (sink-like tokens, e.g. "." and " the" in SmolLM2), not for the local attention of the last queries."""

    weight: float = 2.0
    min_distance: int = 64
    per_layer: bool = True
    query_window: int = 128
    name: str = "triattention-persistent"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        far = torch.stack([distant_attention(inputs, i, self.min_distance) for i in range(len(inputs.keys))])
        unseen = far.isnan()  # [L, B, Hkv, N]: the newest tokens
        far = torch.where(unseen, far.nanmean(-1, keepdim=True), far)  # neutral in the z-score
        bonus = layer_zscore(far.clamp_min(1e-12).log(), inputs, self.per_layer)
        scored = super().scores(inputs) + self.weight * bonus
        # the unseen are kept, at most half the budget of them (the newest): the rest must hold the sinks
        window = min(self.min_distance, inputs.budget // 2)
        return protect_recent(scored, inputs, window, sinks=0)


def lasting_attention(inputs: CompactionInputs, min_distance: int) -> torch.Tensor:
    """``[L, B, Hkv, N]``: the attention each cached key has received over its whole stay in the cache from the
    queries at least ``min_distance`` positions after it (``inputs.distant_attention``, summed over each GQA group),
    divided by their number ``next_position - position - min_distance``; NaN for a key no such query has seen."""
    count = inputs.next_position - inputs.positions - min_distance  # [L, B, Hkv, N]
    mean = inputs.distant_attention / count.clamp_min(1)
    return mean.masked_fill(count <= 0, torch.nan)


@dataclass
class TriAttentionLasting(TriAttention):
    """(h) The lifetime version of (g): TriAttention's predicted score plus ``weight`` times the z-scored log of
    :func:`lasting_attention`, the mean attention a token has received from every query at least ``min_distance``
    positions after it since it entered the cache (a distance-filtered H2O, accumulated in the compiled step), per
    layer and KV head, one keep set per layer (``per_layer``; the defaults, weight 100 and distance 128, are the
    settings chosen on the development documents: the lasting attention ranks, TriAttention breaks near-ties). The
    newest ``min_distance`` tokens, which no such query has seen, get a neutral value and are kept, at most half the
    budget of them. Needs the attention sums (``accumulate_attention``), so, like (d), it does not run in the vLLM
    plugin."""

    weight: float = 100.0
    min_distance: int = 128
    per_layer: bool = True
    accumulate_attention = True
    name: str = "triattention-lasting"

    def __post_init__(self):
        if self.min_distance < 1:
            raise ValueError(f"{self.name}: min_distance must be >= 1, got {self.min_distance}")

    @property
    def distant_attention(self) -> int:
        return self.min_distance

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        if inputs.distant_attention is None:
            raise ValueError(f"{self.name} needs the distance-filtered attention sums (the step records them only "
                             "when the compressor's policy sets distant_attention)")
        far = lasting_attention(inputs, self.min_distance)
        unseen = far.isnan()
        far = torch.where(unseen, far.nanmean(-1, keepdim=True).nan_to_num(1.0), far)  # neutral in the z-score
        bonus = layer_zscore(far.clamp_min(1e-12).log(), inputs, self.per_layer)
        scored = super().scores(inputs) + self.weight * bonus
        return protect_recent(scored, inputs, min(self.min_distance, inputs.budget // 2), sinks=0)


@dataclass
class TriAttentionReserve(TriAttentionLasting):
    """(i) (h) with a reserve for what no distant query has asked for yet: ``share`` of the budget, per layer and KV
    head, goes to the competing slots R-KV ranks highest (:class:`RKV`: the last 8 queries' attention, max-pooled,
    minus key redundancy), the rest to (h)'s ranking. A fact that only a later question reads (a name, a number)
    receives little attention from the text after it, so (h) alone evicts it; its key is unlike the text around it.
    The default, half the budget, is the setting that recalled the most facts on the development documents; with
    (h)'s protected newest (at most the other half) it leaves (h)'s ranking nothing at B <= 2 * min_distance."""

    share: float = 0.5
    query_window: int = 8
    name: str = "triattention-reserve"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.share <= 0.5:
            raise ValueError(f"{self.name}: share must be in [0, 0.5] (the newest tokens may hold the other half), "
                             f"got {self.share}")

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        scored = super().scores(inputs)  # [L, B, Hkv, N]: (h), the newest protected (+inf)
        reserve = int(self.share * inputs.budget)
        if reserve == 0:
            return scored
        ranked = rkv_ranking(inputs, scored, self.query_window)
        picked = ranked.topk(min(reserve, ranked.shape[-1]), dim=-1).indices
        return scored.scatter(-1, picked, torch.inf)


@dataclass
class TriAttentionCopy(TriAttentionReserve):
    """(j) Per-layer budgets for the copy layers: the layers with an echo or induction head (a copy score of at
    least ``threshold``, measured on random tokens when the model is optimized: ``calibration/copy_heads.py``) keep
    ``boost`` times the budget per KV head, ranked by (i); the others share the rest of the same mean (none below
    ``divide_length``), ranked by (h). The memory is the mean budget's: the cache gives each layer its own number of
    slots (``layer_budgets``). Round 6 found the retrieval probe's facts and R-KV's advantage in these heads; round 7's
    emulation gave them more slots at the same mean (``results/quality-budgets/``); the defaults are the settings
    chosen there, on the development documents. Needs a transformers model (for the copy scores) or ``copy_layers``
    given; HF path only (the vLLM plugin's cache has one budget)."""

    boost: float = 1.5
    threshold: float = 0.05
    copy_layers: tuple[int, ...] | None = None
    name: str = "triattention-copy"

    def __post_init__(self):
        super().__post_init__()
        if self.boost <= 1:
            raise ValueError(f"{self.name}: boost must be > 1 (the copy layers' share of the mean budget), "
                             f"got {self.boost}")

    def layer_budgets(self, model, budget: int, layout, floor: int) -> tuple[int, ...] | None:
        from triattn_compile.calibration.copy_heads import boosted_budgets, copy_layers, copy_scores

        if self.copy_layers is None:
            self.copy_layers = tuple(copy_layers(copy_scores(model), self.threshold))
        boosted = [i for i in self.copy_layers if i in layout.scored_layers]  # window layers keep their newest
        return boosted_budgets(budget, layout.num_layers, boosted, self.boost, floor)

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        boosted = inputs.layers is not None and set(inputs.layers) <= set(self.copy_layers or ())
        return super().scores(inputs) if boosted else TriAttentionLasting.scores(self, inputs)


def plans_layer_budgets(policy: Policy) -> bool:
    """Whether ``policy`` plans per-layer budgets (:meth:`Policy.layer_budgets`): its cache is laid out per layer."""
    return type(policy).layer_budgets is not Policy.layer_budgets


def rkv_ranking(inputs: CompactionInputs, scored: torch.Tensor, query_window: int) -> torch.Tensor:
    """R-KV's score (:class:`RKV`) of the slots ``scored`` ``[X, B, Hkv, N]`` does not already keep (``+inf``), per
    layer (averaged over the layers when ``X`` = 1); ``-inf`` for the kept, the protected and R-KV's own window."""
    rkv = RKV(query_window=query_window)
    ranked = torch.stack([F.pad(rkv.layer_scores(inputs, i), (0, rkv.query_window), value=-torch.inf)
                          for i in range(len(inputs.keys))])  # [L, B, Hkv, N]
    if scored.shape[0] == 1:  # one keep set shared by the layers
        ranked = ranked.mean(0, keepdim=True)
    return ranked.masked_fill(~inputs.candidates() | torch.isinf(scored), -torch.inf)


@dataclass
class TriAttentionCoverage(TriAttentionLasting):
    """(j) (i) with the split between the two rankings made per layer and KV head: (h)'s lasting attention keeps the
    fewest older tokens that hold ``coverage`` of it (a head whose distant queries read a few tokens keeps few, one
    that reads widely keeps many, up to the budget), and R-KV's ranking (:class:`RKV`, as in (i)) fills the rest of
    the budget; the newest ``min_distance`` tokens are kept as in (h). The default, 0.9, is the setting chosen on the
    development documents (the most facts recalled, then the lowest NLL). Needs the live attention, like (h)."""

    coverage: float = 0.9
    query_window: int = 8
    name: str = "triattention-coverage"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.coverage <= 1:
            raise ValueError(f"{self.name}: coverage must be in (0, 1], got {self.coverage}")

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        scored = super().scores(inputs)  # [L, B, Hkv, N]: (h), the newest protected (+inf)
        older = inputs.candidates() & ~torch.isinf(scored)
        mass = torch.where(older, lasting_attention(inputs, self.min_distance).nan_to_num(0.0), 0.0)
        heaviest, order = mass.sort(-1, descending=True)
        held = heaviest.cumsum(-1) / heaviest.sum(-1, keepdim=True).clamp_min(1e-30)
        room = inputs.budget - inputs.num_protected - torch.isinf(scored).sum(-1, keepdim=True)
        lasting = torch.minimum((held < self.coverage).sum(-1, keepdim=True) + 1, room)  # [L, B, Hkv, 1]
        places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, places)  # each slot's place in the order
        keep = torch.isinf(scored) | (older & (rank < lasting))
        return torch.where(keep, torch.inf, rkv_ranking(inputs, scored, self.query_window))


@dataclass
class StreamingLLM(Policy):
    """Attention sinks + recent tokens (Xiao et al., 2023, arXiv 2309.17453; R-KV repo ``streamingllm.py``).

    Args:
        sinks: the first tokens of the sequence (absolute positions ``< sinks``), always kept; the rest of the budget
            goes to the most recent tokens.
    """

    sinks: int = 4
    name: str = "streamingllm"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        pos = inputs.positions.to(torch.float64)  # later = higher
        return pos.masked_fill(inputs.positions < self.sinks, torch.inf)


def window_attention(inputs: CompactionInputs, layer: int, window: int, kernel: int) -> torch.Tensor:
    """SnapKV/R-KV importance of the non-window slots of one layer (``rkv/utils.compute_attention_scores``).

    Logits of the last ``window`` post-RoPE queries against the keys, scaled by 1/sqrt(D), max over each GQA group,
    softmax over the ``N - window`` older keys, mean over the queries, 1-D max-pool of width ``kernel``.

    Returns:
        ``[B, Hkv, N - window]`` float32.
    """
    keys = inputs.keys[layer].float()  # [B, Hkv, N, D]
    q = inputs.queries[layer, :, :, -window:].float()  # [B, H, W, D]
    B, Hkv, N, D = keys.shape
    q = q.view(B, Hkv, q.shape[1] // Hkv, window, D)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys).amax(2) / math.sqrt(D)  # [B, Hkv, W, N]
    probs = logits[..., : N - window].softmax(-1).mean(-2)  # [B, Hkv, N - W]
    return F.max_pool1d(probs, kernel_size=kernel, padding=kernel // 2, stride=1)


@dataclass
class SnapKV(Policy):
    """SnapKV (Li et al., 2024, arXiv 2404.14469), decode-time variant as run by R-KV and TriAttention (§7): the
    attention of the last 8 queries, max-pooled; the last 8 tokens are kept.

    Args:
        query_window: observation queries (and protected recent tokens), α = 8. kernel: max-pool width, 7.
    """

    query_window: int = 8
    kernel: int = 7
    name: str = "snapkv"

    @property
    def recent_window(self) -> int:
        return self.query_window

    def layer_scores(self, inputs: CompactionInputs, layer: int) -> torch.Tensor:
        """``[B, Hkv, N - query_window]`` scores of one layer's slots before the observation window."""
        return window_attention(inputs, layer, self.query_window, self.kernel)

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        out = [F.pad(self.layer_scores(inputs, i), (0, self.query_window), value=torch.inf)
               for i in range(len(inputs.keys))]
        return torch.stack(out)  # [L, B, Hkv, N]: each layer keeps its own set


def key_redundancy(keys: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """R-KV redundancy (``rkv/utils.cal_similarity``, ``retain_direction="last"``) of keys ``[B, Hkv, N, D]``.

    Cosine similarity of every key pair with the diagonal zeroed; in each row the most recent (largest-index)
    entry above ``threshold`` is zeroed (entry 0 when none is); column mean over rows, then softmax over the keys.

    Returns:
        ``[B, Hkv, N]`` float32; higher = more redundant.
    """
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = k @ k.transpose(-1, -2)  # [B, Hkv, N, N]
    n = sim.shape[-1]
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    cols = torch.arange(n, device=sim.device)
    last = torch.where(sim > threshold, cols, 0).amax(-1, keepdim=True)  # [B, Hkv, N, 1]
    sim.scatter_(-1, last, 0.0)
    return sim.mean(-2).softmax(-1)


@dataclass
class RKV(SnapKV):
    """R-KV (Cai et al., 2025, arXiv 2505.24133; §6): λ·importance − (1 − λ)·redundancy, per layer and KV head, the
    importance being SnapKV's; the last α tokens are kept.

    Args:
        mix_lambda: λ = 0.1 (the paper's and TriAttention's runs). query_window: α = 8. kernel: max-pool width 7.
        threshold: cosine similarity above which the most recent similar key is not counted as redundant, 0.5.
    """

    mix_lambda: float = 0.1
    threshold: float = 0.5
    name: str = "rkv"

    def layer_scores(self, inputs: CompactionInputs, layer: int) -> torch.Tensor:
        importance = super().layer_scores(inputs, layer)
        redundancy = key_redundancy(inputs.keys[layer], self.threshold)[..., : -self.query_window]
        return self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy


@dataclass
class H2O(Policy):
    """H2O heavy hitters (Zhang et al., 2023, arXiv 2306.14048): the attention each cached token has received, summed
    over every query since it entered the cache and over each GQA group, per layer and KV head.

    Args:
        recent_window: most recent tokens always kept (8, like SnapKV and R-KV; the H2O paper gives half the budget
            to recent tokens: ``H2O(recent_window=budget // 2)``).
    """

    recent_window: int = 8
    accumulate_attention = True
    name: str = "h2o"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        return inputs.attention.clone()


@dataclass
class RandomPolicy(Policy):
    """Uniformly random keep sets, one per layer and KV head (reseeded ``seed + round`` every compaction)."""

    seed: int = 0
    name: str = "random"

    def scores(self, inputs: CompactionInputs) -> torch.Tensor:
        return row_noise(inputs.positions.float(), self.seed + inputs.round)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (TriAttention, TriAttentionNoTrig, TriAttentionNoNorm, TriAttentionNoMLR, TriAttentionRecent,
                TriAttentionDiverse, TriAttentionValueNorm, TriAttentionObserved, TriAttentionDistinct,
                TriAttentionLive, TriAttentionPersistent, TriAttentionLasting, TriAttentionReserve,
                TriAttentionCoverage, TriAttentionCopy, StreamingLLM,
                SnapKV, RKV, H2O, RandomPolicy)
}


def make_policy(policy: str | Policy, **triattention_options) -> Policy:
    """A policy object from a name in :data:`POLICIES` (TriAttention and its ablations take ``triattention_options``,
    those given as ``None`` left at the class's default; the others their defaults) or as given."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)} or pass a Policy object")
    cls = POLICIES[policy]
    given = {name: value for name, value in triattention_options.items() if value is not None}  # None: the default
    return cls(**given) if issubclass(cls, TriAttention) else cls()
