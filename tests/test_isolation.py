"""``optimize`` and ``calibrate`` leave the rest of the process alone: functions compiled before keep their compiled
code, several optimized models (other budgets, the same class) work side by side, importing changes nothing."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import tiny_llama
from torch._dynamo.utils import counters

import triattn_compile as tc


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def test_functions_compiled_before_keep_their_compiled_code():
    compiled_graphs = []

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    user_fn = torch.compile(lambda x: torch.sin(x) * 2, backend=backend)
    other = tiny_llama(seed=1)  # the user compiled another instance of the class tc optimizes
    user_model = torch.compile(other, backend=backend)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    x = torch.randn(8)
    with torch.no_grad():
        user_fn(x), user_model(ids)
    before = (len(compiled_graphs), counters["stats"]["unique_graphs"])

    model = tiny_llama()
    tc.calibrate(model, ids[0])
    tc.optimize(model, budget=32, divide_length=16, compiler="eager")
    _greedy(model, ids, 40)
    with torch.no_grad():
        user_fn(x), user_model(ids)
    assert len(compiled_graphs) == before[0], "a function compiled before optimize() was compiled again"
    assert counters["stats"]["unique_graphs"] > before[1]  # the counters do see compilations (optimize's own)


def test_models_optimized_with_other_budgets_in_one_process_all_work():
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    models = {budget: tiny_llama() for budget in (32, 48, 64)}
    reference = _greedy(tiny_llama(), ids, 20)  # fits every budget: equal to full attention
    for budget, model in models.items():
        tc.optimize(model, budget=budget, divide_length=16, compiler="eager")
    for budget, model in models.items():  # each model after all were optimized, twice
        for _ in range(2):
            assert torch.equal(_greedy(model, ids, 20), reference), budget
        long = _greedy(model, ids, 3 * budget)
        cache = tc.current_cache(model)
        assert long.shape[1] == 6 + 3 * budget and cache.compactions() >= 1
        assert cache.peak_occupancy() <= budget + 16
    tc.restore(models[32])
    assert torch.equal(_greedy(models[32], ids, 20), reference)


def test_importing_the_package_changes_no_global_config():
    code = (
        "import torch, torch._dynamo, torch._inductor.config as ic\n"
        "before = (torch._dynamo.config.get_config_copy(), ic.get_config_copy())\n"
        "import triattn_compile\n"
        "after = (torch._dynamo.config.get_config_copy(), ic.get_config_copy())\n"
        "changed = [k for b, a in zip(before, after) for k in b if repr(b[k]) != repr(a.get(k))]\n"
        "print(changed)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@torch.no_grad()
def test_plain_pytorch_adapters_optimized_twice_in_one_process():
    """The gpt-fast-style test decoder (its own modules, complex RoPE), optimized at two budgets side by side."""
    from passes.gptfast import CompressedCacheAdapter, ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs()).eval()
    model.setup_caches(1, 256)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))

    def greedy(step, n):
        out, logits = [ids], step(ids, 0)
        for i in range(n):
            out.append(logits[:, -1:].argmax(-1))
            logits = step(out[-1], ids.shape[1] + i)
        return torch.cat(out, 1)

    reference = greedy(lambda x, p: model(x, torch.arange(p, p + x.shape[1])), 20)
    wrapped = {b: tc.optimize(CompressedCacheAdapter(model), budget=b, divide_length=16, compiler="eager")
               for b in (32, 48)}
    for budget, adapter in wrapped.items():
        def step(x, pos, adapter=adapter):
            return adapter(input_ids=x, past_key_values=None if pos == 0 else tc.current_cache(adapter))

        assert torch.equal(greedy(step, 20), reference), budget
        greedy(step, 3 * budget)
        assert tc.current_cache(adapter).compactions() >= 1
