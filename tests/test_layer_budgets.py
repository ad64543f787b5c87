"""Per-layer budgets (``layer_budgets=``): every layer shares the ring new tokens go to, and keeps its budget's
remaining tokens in slots of its own (``cache.py``). Checked against a simulator: the unmodified model in eager mode
with a ``DynamicCache`` evicted, after each of the library's compactions, to exactly the positions the library holds
in each layer and KV head; logits must agree at every step, so attention reads each layer's ring and extra slots
and nothing else."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

import triattn_compile as tc
from triattn_compile.calibration.copy_heads import boosted_budgets, copy_layers, copy_scores
from triattn_compile.policies import TriAttentionCopy, TriAttentionLasting, TriAttentionReserve

BUDGETS = (8, 24, 16)  # shared ring budget 8; extra slots 0, 16, 8
DIVIDE = 8


def _held_positions(cache, layer: int) -> torch.Tensor:
    """``[Hkv, k]`` the positions layer ``layer`` holds in row 0, sorted per head."""
    pos = cache.slot_pos[layer, 0]
    per_head = [p[p >= 0].sort().values for p in pos]
    assert len({p.numel() for p in per_head}) == 1, "every KV head of a layer holds as many tokens"
    return torch.stack(per_head)


@torch.no_grad()
def _run(model, steps: int, seed: int = 0, **options):
    """Feed a 4-token prompt then one token per call to the optimized ``model`` and to the simulator; returns the
    largest logit difference after the first compaction, the compressed cache, and the held counts per layer seen
    right after each compaction."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (1, 4 + steps), generator=gen)
    reference = tiny_llama(layers=len(BUDGETS))
    reference.load_state_dict(model.state_dict())
    tc.optimize(model, divide_length=DIVIDE, **{"compiler": "eager", **options})
    sim, sim_pos = DynamicCache(), None
    worst, rounds, after = 0.0, 0, []
    try:
        chunks = [tokens[:, :4]] + [tokens[:, i : i + 1] for i in range(4, tokens.shape[1])]
        seen, cache = 0, None
        for ids in chunks:
            n = ids.shape[1]
            positions = torch.arange(seen, seen + n)[None]
            ours = model(input_ids=ids, position_ids=positions, past_key_values=cache if seen else None).logits
            cache = tc.inspect(model).cache
            theirs = reference(input_ids=ids, past_key_values=sim, position_ids=positions, use_cache=True).logits
            new = positions.expand(cache.slot_pos.shape[2], -1)
            sim_pos = [new.clone() for _ in BUDGETS] if sim_pos is None else [torch.cat([p, new], 1) for p in sim_pos]
            seen += n
            if rounds:
                worst = max(worst, float((ours - theirs).abs().max()))
            else:
                assert torch.allclose(ours, theirs, atol=1e-5), "before the first compaction: the model itself"
            if cache.rounds > rounds:  # the library compacted after this step: evict the simulator to its keep sets
                rounds = cache.rounds
                after.append([int((cache.slot_pos[i, 0, 0] >= 0).sum()) for i in range(len(BUDGETS))])
                for i, layer in enumerate(sim.layers):
                    held = _held_positions(cache, i)
                    idx = (sim_pos[i][:, None, :] == held[:, :, None]).int().argmax(-1)  # [Hkv, k]
                    assert torch.equal(sim_pos[i].gather(1, idx), held), "the library holds a position never fed"
                    for name in ("keys", "values"):
                        t = getattr(layer, name)
                        setattr(layer, name, t.gather(2, idx[None, :, :, None].expand(1, -1, -1, t.shape[-1])))
                    sim_pos[i] = held
    finally:
        tc.restore(model)
    return worst, cache, after


@pytest.mark.parametrize("policy", ["triattention", "streamingllm", "triattention-lasting"])
def test_each_layer_attends_to_exactly_its_kept_tokens(policy):
    worst, cache, after = _run(tiny_llama(layers=len(BUDGETS)), steps=70, layer_budgets=BUDGETS, policy=policy)
    assert cache.rounds >= 6 and worst < 1e-4
    # the ring fills to 16 and is compacted: each layer keeps min(its budget, what it held)
    assert after[0] == [8, 16, 16] and after[1] == [8, 24, 16] and all(a == list(BUDGETS) for a in after[1:])
    assert [layer.keys.shape[2] for layer in cache.layers] == [16, 32, 24]  # ring + extra slots, per layer


def test_layers_of_different_widths_compile_with_inductor():
    worst, cache, after = _run(tiny_llama(layers=len(BUDGETS)), steps=40, layer_budgets=BUDGETS,
                               policy="triattention-lasting", compiler="inductor")
    assert cache.rounds >= 3 and worst < 1e-4 and after[1] == list(BUDGETS)


def test_memory_is_that_of_the_mean_budget():
    model = tiny_llama(layers=len(BUDGETS))
    _, cache, _ = _run(model, steps=20, layer_budgets=BUDGETS)
    _, uniform, _ = _run(model, steps=20, budget=16)
    kv = [sum(t.numel() for layer in c.layers for t in (layer.keys, layer.values)) for c in (cache, uniform)]
    assert kv[0] == kv[1]  # mean(8, 24, 16) = 16: as many slots as budget 16 in every layer


def test_equal_layer_budgets_are_the_uniform_cache():
    model = tiny_llama(layers=len(BUDGETS))
    _, per_layer, _ = _run(model, steps=40, layer_budgets=(16, 16, 16))
    _, uniform, _ = _run(model, steps=40, budget=16)
    assert torch.equal(per_layer.slot_pos, uniform.slot_pos)
    for a, b in zip(per_layer.layers, uniform.layers):
        assert torch.equal(a.keys, b.keys)


@pytest.mark.parametrize(("options", "message"), [
    ({"layer_budgets": (16, 16)}, "layer_budgets has 2 entries and the model 3 attention layers"),
    ({"layer_budgets": (16, 16, 0)}, "layer_budgets must be positive ints"),
    ({"layer_budgets": (16, 16, 16), "budget": 32}, "budget=32 and layer_budgets"),
    ({"layer_budgets": (4, 16, 16)}, "every layer's budget"),
])
def test_bad_layer_budgets_get_one_line(options, message):
    model = tiny_llama(layers=len(BUDGETS))
    with pytest.raises(ValueError, match=message) as err:
        tc.optimize(model, divide_length=DIVIDE, compiler="eager", **options)
        model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert "\n" not in str(err.value)


def test_copy_policy_ranks_its_boosted_layers_by_reserve_and_the_rest_by_lasting(monkeypatch):
    seen = []
    original = TriAttentionCopy.scores

    def spy(self, inputs):
        out = original(self, inputs)
        plain = TriAttentionLasting(min_distance=4) if inputs.layers == [0, 2] else TriAttentionReserve(min_distance=4)
        seen.append((list(inputs.layers), inputs.budget, out, plain.scores(inputs)))  # before compaction moves them
        return out

    monkeypatch.setattr(TriAttentionCopy, "scores", spy)
    policy = TriAttentionCopy(copy_layers=(1,), min_distance=4)
    worst, cache, _ = _run(tiny_llama(layers=len(BUDGETS)), steps=60, budget=16, policy=policy)
    assert [layer.keys.shape[2] for layer in cache.layers] == [20, 32, 20]  # budgets (12, 24, 12): mean 16
    assert worst < 1e-4
    groups = {tuple(layers) for layers, *_ in seen}
    assert groups == {(0, 2), (1,)}
    for layers, budget, out, plain in seen[-2:]:
        assert budget == (12 if layers == [0, 2] else 24)
        assert torch.equal(out, plain)


def test_boosted_budgets_keep_the_mean_and_the_floor():
    high, low = 384, (30 * 256 - 13 * 384) // 17
    layers = [2, 7, 8, 9, 14, 15, 17, 18, 20, 21, 22, 23, 24]
    budgets = boosted_budgets(256, 30, layers, 1.5, 128)
    assert [budgets[i] for i in layers] == [high] * 13 and set(budgets) == {high, low}
    assert sum(budgets) <= 30 * 256 and low == 158
    shrunk = boosted_budgets(160, 30, layers, 1.5, 128)  # 240 / 98 would go below the floor: 128 and what is left
    assert min(shrunk) == 128 and sum(shrunk) <= 30 * 160 and max(shrunk) == (30 * 160 - 17 * 128) // 13
    assert boosted_budgets(128, 30, layers, 1.5, 128) is None  # nothing left to boost with
    assert boosted_budgets(256, 30, [], 1.5, 128) is None


def test_copy_scores_are_probabilities_per_layer_and_kv_head():
    model = tiny_llama(layers=2)
    scores = copy_scores(model, length=32, rows=2)
    assert scores.shape == (2, 2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    assert copy_layers(scores, threshold=1.01) == [] and copy_layers(scores, threshold=0.0) == [0, 1]
    with pytest.raises(ValueError, match="copy scores need a transformers model"):
        copy_scores(torch.nn.Linear(2, 2))


def test_per_layer_budgets_refused_where_they_cannot_be_held():
    class OwnCache(torch.nn.Module):  # gpt-fast's call convention: keeps its own KV buffers
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, idx, input_pos):
            return self.proj(idx)

    for options in ({"layer_budgets": (128, 256)}, {"policy": "triattention-copy"}):
        with pytest.raises(ValueError, match="per-layer budgets .* need the model to write a transformers-style") as e:
            tc.optimize(OwnCache(), **options)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="boost must be > 1"):
        TriAttentionCopy(boost=1.0)


def test_eval_gives_a_policy_that_plans_budgets_its_own_cache():
    from types import SimpleNamespace

    from triattn_compile.evaluation.harness import PolicySwitch, plans_budgets

    assert plans_budgets("triattention-copy/boost=2") and not plans_budgets("triattention-lasting")
    layout = SimpleNamespace(num_layers=3, scored_layers=[0, 1, 2])
    assert PolicySwitch(TriAttentionCopy(copy_layers=(1,))).layer_budgets(None, 16, layout, 8) == (12, 24, 12)
    assert PolicySwitch().layer_budgets(None, 16, layout, 8) is None
