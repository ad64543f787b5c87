"""``optimize`` on a CUDA model: statistics (calibrated, loaded, online), the compressed cache and compaction all
live on the model's device. Skipped without CUDA; the GPU workflow and lent GPU sessions run it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("offline", [False, True], ids=["online-stats", "stats-file"])
def test_generate_past_compactions_on_cuda(tmp_path, offline: bool) -> None:
    model = tiny_llama().cuda()
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(3)).cuda()
    options = {}
    if offline:
        stats = tc.calibrate(model, torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(4)))
        assert stats.sum_re.is_cuda
        options["stats"] = stats.save(tmp_path / "stats.safetensors")
    tc.optimize(model, budget=132, **options)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=400, do_sample=False)
    cache = tc.current_cache(model)
    assert out.shape == (2, 404)
    assert cache.compactions() >= 2
    assert max(cache.occupancy()) <= 132 + 128
    assert cache.slot_pos.is_cuda and tc.query_stats(model).sum_re.is_cuda
