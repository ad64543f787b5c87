"""A ``triattn calibrate`` file of the model's HF checkpoint is validated against the layout in vLLM's graph."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from triattn_compile.calibration.stats import StatsError
from triattn_compile.vllm.discovery import layout_from_dict
from triattn_compile.vllm.statsfile import load_for_layout


@pytest.fixture(scope="module")
def found(triattn_run):
    return layout_from_dict(triattn_run["reports"][0]["layout"])


def test_layout_survives_the_report(found, triattn_run):
    assert found.layout.signature.__dict__ == triattn_run["reports"][0]["layout"]["signature"]


def test_same_model_loads(found, stats_file):
    assert load_for_layout(stats_file, found.layout).tokens() > 0


def test_another_models_file_is_refused_in_one_line(found, other_stats_file):
    with pytest.raises(StatsError) as info:
        load_for_layout(other_stats_file, found.layout)
    message = str(info.value)
    assert "\n" not in message and "another model" in message and "RoPE frequencies" in message, message


def test_file_without_omega_is_refused(found, stats_file, tmp_path):
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="pt") as fh:
        meta = fh.metadata()
    tensors = {k: v for k, v in load_file(str(stats_file)).items() if k != "omega"}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    with pytest.raises(StatsError, match="no omega tensor"):
        load_for_layout(old, found.layout)


def test_other_shapes_are_refused(found, stats_file, tmp_path):
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="pt") as fh:
        meta = dict(fh.metadata())
    assert found.layout.num_kv_heads == 2 and found.layout.num_heads == 4
    meta["num_kv_heads"] = "1"  # another grouping of the same query heads
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(stats_file)), str(other), metadata=meta)
    with pytest.raises(StatsError, match=r"another model \(num_kv_heads: file has 1, vLLM's graph has 2\)"):
        load_for_layout(other, found.layout)
    # as many KV heads as query heads: an HF model that broadcast its keys (HF's Falcon); per-query-head statistics
    meta["num_kv_heads"] = "4"
    save_file(load_file(str(stats_file)), str(other), metadata=meta)
    assert load_for_layout(other, found.layout).tokens() > 0
