"""One setting turns TriAttention on (``additional_config["triattn"]``); bad settings are refused in one line.

The engine configs are built in this process (``EngineArgs.create_engine_config``: no engine is started)."""

from __future__ import annotations

import os

import pytest

from triattn_compile.vllm import SettingsError, VllmSettings, parse_settings


@pytest.mark.parametrize("raw, match", [
    ({"budget": 0}, r"budget must be a positive int, got 0"),
    ({"budget": -5}, r"budget must be a positive int, got -5"),
    ({"budget": 256, "window": 8}, r"unknown key 'window'; known keys: budget, divide_length"),
    ({"budget": 64}, r"budget \(64\) must be at least divide_length \(128\)"),
    ({"per_layer": "yes"}, r"per_layer must be true or false"),
    ({"stats": "/nonexistent/stats.safetensors"}, r"stats file /nonexistent/stats.safetensors does not exist"),
    ([256], r"must be a JSON object"),
], ids=["budget0", "budget-neg", "unknown-key", "below-divide", "per-layer-type", "missing-stats", "not-a-dict"])
def test_bad_settings_one_line(raw, match):
    with pytest.raises(SettingsError, match=match) as info:
        parse_settings({"triattn": raw})
    assert "\n" not in str(info.value) and str(info.value).startswith("additional_config['triattn']")


def test_absent_means_off():
    assert parse_settings({}) is None and parse_settings({"other_plugin": 1}) is None and parse_settings(None) is None
    assert parse_settings({"triattn": {}}) == VllmSettings()
    assert parse_settings({"triattn": {"budget": 512, "per_layer": True}}) == VllmSettings(budget=512, per_layer=True)


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch):
    """Switching on sets VLLM_DISABLE_COMPILE_CACHE in this process; keep it from the engines started later."""
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", os.environ.get("VLLM_DISABLE_COMPILE_CACHE", ""))
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE")


def _config(model_dir, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), dtype="float32", max_model_len=512, **kwargs).create_engine_config()


def test_engine_config_switches_on_and_off(model_dir, stats_file):
    off = _config(model_dir)
    assert off.compilation_config.backend == "inductor" and not off.parallel_config.worker_extension_cls
    on = _config(model_dir, additional_config={"triattn": {"budget": 256, "stats": str(stats_file)}})
    assert on.compilation_config.backend == "triattn_compile.vllm.backend.inductor"
    assert on.parallel_config.worker_extension_cls == "triattn_compile.vllm.worker.TriAttentionWorkerExtension"
    assert on.scheduler_config.scheduler_cls == "triattn_compile.vllm.scheduler.TriAttentionScheduler"
    assert not on.cache_config.enable_prefix_caching and off.cache_config.enable_prefix_caching


def test_engine_refuses_bad_setting_in_one_line(model_dir):
    with pytest.raises(SettingsError, match=r"^additional_config\['triattn'\]: budget must be a positive int, got 0$"):
        _config(model_dir, additional_config={"triattn": {"budget": 0}})


def test_engine_refuses_eager_mode(model_dir, stats_file):
    with pytest.raises(SettingsError, match=r"compilation is off \(enforce_eager"):
        _config(model_dir, enforce_eager=True, additional_config={"triattn": {"budget": 256, "stats": str(stats_file)}})


def test_engine_refuses_prefix_caching_in_one_line(model_dir, stats_file):
    triattn = {"budget": 256, "stats": str(stats_file)}
    with pytest.raises(SettingsError, match=r"^additional_config\['triattn'\]: prefix caching cannot") as info:
        _config(model_dir, enable_prefix_caching=True, additional_config={"triattn": triattn})
    assert "\n" not in str(info.value)


def test_engine_refuses_stats_inside_the_model_folder(model_dir, stats_file, tmp_path):
    """vLLM loads every ``*.safetensors`` of the model's folder as weights: a stats file there is refused."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    inside = folder / "stats.safetensors"
    shutil.copy(stats_file, inside)
    with pytest.raises(SettingsError, match=r"is in the model's folder, where vLLM would load it as weights") as info:
        _config(folder, additional_config={"triattn": {"budget": 256, "stats": str(inside)}})
    assert "\n" not in str(info.value)
