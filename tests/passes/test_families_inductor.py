"""One family per rotary form and attention form, compiled by Inductor (the default compiler), through compactions:
at every step the compressed model's logits equal an independent reference that applies the same keep sets to the
model's own, unmodified attention.

The reference (:class:`KeptTokensReference`) generalises the simulator of ``tests/test_properties.py`` (there:
llama-like families, keep sets from the independent oracle) to every family here: the unmodified model runs eagerly
on an ordinary ``transformers.DynamicCache``; right after each compaction, read off the compressed cache
(``slot_pos``: per layer and KV head the absolute positions it holds), every layer of the DynamicCache is evicted, per
head, to exactly those positions (a cache head reads the KV head that ``repeat_kv`` maps it to; MLA's per-head
expanded keys all read the one latent). Keys stay rotated at their own positions and each step gets its absolute
``position_ids``, so the reference is the model attending to the kept tokens: which tokens are kept is the library's
choice (``tests/test_properties.py`` and ``tests/test_mla.py`` check the ranking); what the compressed model computes
over them (masking, RoPE at absolute positions, latent reconstruction, sinks, soft-capping, windows) is checked here.

Tokens are a seeded random stream, one per call after a one-token prompt (prefill and decode share one compiled graph:
one Inductor compile per family). Greedy decoding of these tiny random models collapses into repeating one token,
whose keys are then nearly identical and make eviction invisible; random tokens make every keep set matter, which the
test checks: after the first compaction the compressed model's logits differ from the model attending to everything
by more than 100x the tolerance. Checked at every step: max |logits - reference| <= ATOL and the same greedy (argmax)
next token; after each compaction the keep sets are well formed (``budget`` distinct past positions per KV head;
window layers hold exactly their most recent tokens; the global layers share one keep set per KV head holding the
protected prompt). ATOL: float32 logits of magnitude ~0.1-1; the differences seen are <= 3e-7 (Inductor's fused,
reordered reductions); attending to every token instead of the kept ones moves them by >= 1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from test_families import FAMILIES, build, expected_layout
from torch._dynamo.utils import counters

import triattn_compile as tc

BUDGET, DIVIDE = 16, 8  # capacity 24: compactions after 24 and 32 tokens
STEPS = 36  # tokens fed: a one-token prompt, then one per call; two compactions and four steps after
WINDOW = 16  # window layers' sliding window (it must fit the budget)
ATOL = 1e-5
# family -> the forms it brings under Inductor (each rotary form and attention form of the pass at least once)
INDUCTOR: dict[str, str] = {
    "llama": "rotate-half; SDPA over the cache's KV heads (GQA grouped)",
    "gptj": "rotate-every-two (interleaved) on leading partial dims, sin/cos table; eager matmul-softmax-matmul; MHA",
    "smollm3": "NoPE layer next to a rotate-half layer, both compressed",
    "gemma2": "eager attention with tanh soft-capping; window layer",
    "granitemoe_swa": "eager attention with logsumexp sinks; window layer; MoE",
    "gpt_oss": "rotate-half written as halves (chunk); eager attention with a sink column; YaRN scaling; window layer",
    "deepseek_v3": "MLA: latent cache, trailing de-interleaved rotary (interleaved pairs in, halves out), SDPA",
    "deepseek_v2": "MLA: latent cache, trailing complex rotary (view_as_complex)",
}


class KeptTokensReference:
    """The unmodified model, eager, on a ``DynamicCache`` holding per (layer, head) exactly the given positions.

    ``pos[l]`` ``[Hc, N]``: the absolute positions of layer ``l``'s cached entries, per cache head, ascending.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache = model, T.DynamicCache()
        self.pos: list[torch.Tensor] | None = None
        self.seen = 0

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        positions = torch.arange(self.seen, self.seen + n)
        out = self.model(ids, past_key_values=self.cache, position_ids=positions[None], use_cache=True)
        self.seen += n
        if self.pos is None:
            self.pos = [positions.expand(layer.keys.shape[1], n) for layer in self.cache.layers]
        else:
            self.pos = [torch.cat([p, positions.expand(p.shape[0], n)], dim=1) for p in self.pos]
        return out.logits[0, -1].float()

    def evict(self, slot_pos: torch.Tensor) -> None:
        """Keep, per layer and cache head, the positions the compressed cache holds: ``slot_pos`` ``[L, Hkv, C]``
        (row 0; ``-1``: empty)."""
        for i, layer in enumerate(self.cache.layers):
            heads, kv_heads = layer.keys.shape[1], slot_pos.shape[1]
            keep = []
            for h in range(heads):
                held = slot_pos[i, h // (heads // kv_heads)]
                held = held[held >= 0].sort().values
                index = torch.searchsorted(self.pos[i][h].contiguous(), held)
                assert torch.equal(self.pos[i][h][index.clamp(max=self.pos[i].shape[1] - 1)], held), (
                    f"layer {i} head {h}: the compressed cache holds positions the reference had evicted")
                keep.append(index)
            index = torch.stack(keep)  # [Hc, kept]
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, t.gather(2, index[None, :, :, None].expand(t.shape[0], -1, -1, t.shape[-1])))
            self.pos[i] = torch.stack([self.pos[i][h][index[h]] for h in range(heads)])


def _check_keep_sets(slot_pos: torch.Tensor, windows: list[int], seen: int, compaction: int) -> None:
    """``slot_pos`` ``[L, Hkv, C]`` right after compaction ``compaction``, ``seen`` tokens fed."""
    where = f"after compaction {compaction} ({seen} tokens)"
    held = [[sorted(p for p in row.tolist() if p >= 0) for row in layer] for layer in slot_pos]
    for i, layer in enumerate(held):
        for h, kept in enumerate(layer):
            assert len(kept) == len(set(kept)) == BUDGET and 0 <= kept[0] and kept[-1] < seen, (
                f"{where}: layer {i} KV head {h} holds {kept}")
            if windows[i]:  # a window layer keeps its most recent tokens (its window fits the budget)
                assert kept == list(range(seen - BUDGET, seen)), f"{where}: window layer {i} KV head {h}: {kept}"
    scored = [held[i] for i, w in enumerate(windows) if not w]
    assert all(layer == scored[0] for layer in scored), f"{where}: the global layers' keep sets differ"
    assert all(kept[0] == 0 for kept in scored[0]), f"{where}: the protected prompt (position 0) was evicted"


@pytest.mark.parametrize("name", INDUCTOR)
def test_compressed_attention_equals_reference_under_inductor(name):
    """Inductor-compiled compressed model vs the unmodified model on the same keep sets, at every one of 36 steps
    through two compactions (module docstring)."""
    family = FAMILIES[name]
    windowed = "sliding_window" in family.extra and family.extra["sliding_window"]
    model = build(family, **({"sliding_window": WINDOW} if windowed else {}))
    windows = [row["window"] for row in expected_layout(family, model.config).layers]
    assert any(windows) == bool(windowed)
    plain = copy.deepcopy(model)
    reference, everything = KeptTokensReference(plain), KeptTokensReference(plain)  # ``everything`` never evicts
    tc.optimize(model, budget=BUDGET, divide_length=DIVIDE, compiler="inductor")
    ids = torch.randint(3, 128, (1, STEPS), generator=torch.Generator().manual_seed(0))
    cache, compactions, moved = None, 0, 0.0
    with torch.no_grad():
        for t in range(STEPS):
            token = ids[:, t : t + 1]
            logits = model(token, **({} if cache is None else {"past_key_values": cache})).logits[0, -1].float()
            cache = tc.current_cache(model)
            want, whole = reference.step(token), everything.step(token)
            err = float((logits - want).abs().max())
            assert err <= ATOL, f"position {t} (after {compactions} compactions): max |logits - reference| {err:.3g}"
            assert int(logits.argmax()) == int(want.argmax()), f"position {t}: greedy token differs"
            if compactions:
                moved = max(moved, float((logits - whole).abs().max()))
            if cache.compactions() > compactions:
                compactions = cache.compactions()
                _check_keep_sets(cache.slot_pos[:, 0], windows, cache.tokens_seen(), compactions)
                reference.evict(cache.slot_pos[:, 0])
    assert compactions >= 2 and cache.tokens_seen() == STEPS
    assert counters["inductor"], "the compressed step did not go through Inductor"
    assert moved > 100 * ATOL, f"eviction changed no logit (max {moved:.3g}): the comparison would not see it"
