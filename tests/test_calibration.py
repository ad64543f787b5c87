"""Calibration statistics: captured by the pass, saved atomically, validated on load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

import triattn_compile as tc


@pytest.fixture
def stats_file(tmp_path):
    path = tmp_path / "stats.safetensors"
    tc.calibrate(tiny_llama(), torch.randint(0, 128, (700,)), chunk_size=256).save(path)
    return path


def _signature(model) -> tc.RotarySignature:
    return tc.inspect(tc.optimize(model, budget=256, compiler="eager")).layout.signature


def test_roundtrip_and_metadata(stats_file):
    model = tiny_llama()
    stats = tc.calibrate(model, torch.randint(0, 128, (700,)), chunk_size=256)
    assert stats.tokens() == 700
    loaded = tc.QueryStats.load(stats_file, stats.signature)
    assert loaded.tokens() == 700
    assert loaded.q_mean().shape == (2, 4, 8)
    assert bool((loaded.q_abs() >= loaded.q_mean().abs() - 1e-6).all())  # E|q| >= |E q|
    with open(stats_file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    assert meta["pairing"] == "half" and meta["num_kv_heads"] == "2" and meta["tokens"] == "700"


def test_offline_stats_drive_optimize(stats_file):
    model = tiny_llama()
    tc.optimize(model, budget=160, stats=stats_file, compiler="eager")
    before = tc.query_stats(model).q_mean().clone()
    ids = torch.randint(0, 128, (1, 10))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, do_sample=False)
    assert tc.current_cache(model).compactions() >= 1
    assert torch.equal(tc.query_stats(model).q_mean(), before)  # offline stats are not updated online


def test_truncated_file(stats_file):
    data = stats_file.read_bytes()
    stats_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(tiny_llama(), budget=256, stats=stats_file)
    assert "truncated" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(tiny_llama(), budget=256, stats=tmp_path / "nope.safetensors")
    assert "does not exist" in str(exc.value)


@pytest.mark.parametrize("bad", ["shape", "dtype", "nan"])
def test_wrong_tensor(stats_file, bad):
    from safetensors import safe_open

    with safe_open(str(stats_file), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if bad == "shape":
        tensors["q_abs_mean"] = tensors["q_abs_mean"][:, :3].contiguous()
    elif bad == "dtype":
        tensors["q_mean_real"] = tensors["q_mean_real"].double()
    else:
        tensors["q_mean_imag"][0, 0, 0] = float("nan")
    save_file(tensors, str(stats_file), metadata=meta)
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(tiny_llama(), budget=256, stats=stats_file)
    assert "expected finite float32" in str(exc.value)


@pytest.mark.parametrize("field, value", [("rotary_start", "16"), ("pairing", "interleaved"), ("num_kv_heads", "1")])
def test_metadata_of_another_model(stats_file, field, value):
    from safetensors import safe_open

    with safe_open(str(stats_file), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta[field] != value
    save_file(tensors, str(stats_file), metadata={**meta, field: value})
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(tiny_llama(), budget=256, stats=stats_file)
    assert f"{field}: file has {value}" in str(exc.value) and "\n" not in str(exc.value)


def test_file_without_rotary_start_loads(stats_file):
    from safetensors import safe_open

    with safe_open(str(stats_file), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    del meta["rotary_start"]  # written before the field existed: rotary dims lead the head
    save_file(tensors, str(stats_file), metadata=meta)
    tc.optimize(tiny_llama(), budget=256, stats=stats_file, compiler="eager")


def test_not_a_stats_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(tc.StatsError) as exc:
        tc.optimize(tiny_llama(), budget=256, stats=path)
    assert "not a triattn stats file" in str(exc.value)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import triattn_compile.calibration.stats as stats_mod

    stats = tc.calibrate(tiny_llama(), torch.randint(0, 128, (100,)))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        stats.save(tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []
