"""The statistics check of the vLLM leg (``vllm/statsfile.py``), without vLLM: ω read off a bfloat16 cos/sin table
(what vLLM's graph holds for a bfloat16 model) is only as precise as that dtype, and a file of the same model must
still load, while another model's is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc
from triattn_compile.calibration.stats import StatsError
from triattn_compile.passes.frequencies import omega_from_probe
from triattn_compile.vllm.discovery import VllmLayout
from triattn_compile.vllm.statsfile import OMEGA_RTOL, load_for_layout


def omega_from_table(omega: torch.Tensor, dtype: torch.dtype, positions: int = 1024) -> torch.Tensor:
    """ω ``[L, F]`` as discovery fits it from a cos/sin table of ``dtype`` at positions ``0 .. positions - 1``."""
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * omega[0]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # vLLM's cos_sin_cache, in the model's dtype
    fitted = omega_from_probe(cos, sin, "half", "bands", omega.shape[-1], fit=True)
    return fitted.expand_as(omega)


@pytest.fixture(scope="module")
def model_and_stats(tmp_path_factory):
    model = tiny_llama(head_dim=64, heads=2, kv_heads=1, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 100000.0})
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    tc.calibrate(model, torch.randint(0, 128, (64,))).save(path)
    return model, path


def test_a_bfloat16_table_reads_omega_to_its_resolution_and_the_file_still_loads(model_and_stats):
    model, path = model_and_stats
    layout = tc.discover(model)
    found = VllmLayout(dataclasses.replace(layout, omega=omega_from_table(layout.omega, torch.bfloat16)), ("a", "b"),
                       "bfloat16")
    error = ((found.layout.omega - layout.omega).abs() / layout.omega).max()
    assert OMEGA_RTOL < error < found.omega_rtol  # measured 1.1e-3 on SmolLM2-135M's table in vLLM
    with pytest.raises(StatsError, match="RoPE frequencies differ") as info:
        load_for_layout(path, found.layout, OMEGA_RTOL)  # what a float32 tolerance did: the same model refused
    assert "relative, at layer " in str(info.value) and "\n" not in str(info.value)  # which band, for diagnosis
    assert load_for_layout(path, found.layout, found.omega_rtol).tokens() == 64
    float32 = VllmLayout(dataclasses.replace(layout, omega=omega_from_table(layout.omega, torch.float32)), ("a", "b"))
    assert float32.omega_rtol == OMEGA_RTOL and load_for_layout(path, float32.layout, float32.omega_rtol).tokens()


def test_another_rope_base_is_refused_even_at_bfloat16_resolution(model_and_stats):
    _, path = model_and_stats
    other = tiny_llama(head_dim=64, heads=2, kv_heads=1, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0})
    layout = tc.discover(other)
    found = VllmLayout(dataclasses.replace(layout, omega=omega_from_table(layout.omega, torch.bfloat16)), ("a", "b"),
                       "bfloat16")
    with pytest.raises(StatsError, match="made for another model"):
        load_for_layout(path, found.layout, found.omega_rtol)


def tiny_falcon(kv_heads: int = 2) -> torch.nn.Module:
    """HF's Falcon, new decoder architecture (``bench/vllm_families.py``'s config): it broadcasts each key to its
    query heads before the cache, so discovery and ``triattn calibrate`` record as many KV heads as query heads."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_kv_heads=kv_heads, new_decoder_architecture=True, alibi=False, bias=False,
                          parallel_attn=True, max_position_embeddings=2048,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return FalconForCausalLM(config).eval()


def test_falcons_broadcast_keys_file_loads_against_vllms_fewer_kv_heads(tmp_path):
    model = tiny_falcon()
    hf = tc.discover(model)
    assert (hf.num_heads, hf.num_kv_heads) == (4, 4)  # HF's cache holds the broadcast keys
    path = tmp_path / "falcon.safetensors"
    tc.calibrate(model, torch.randint(0, 128, (64,))).save(path)
    omega = omega_from_table(hf.omega, torch.float32)
    for kv_heads in (2, 1):  # vLLM's graph keeps the real KV heads (2 here; 1 divides 4 as well)
        vllm = dataclasses.replace(hf, num_kv_heads=kv_heads, omega=omega)
        stats = load_for_layout(path, vllm)
        assert stats.tokens() == 64 and tuple(stats.q_mean().shape) == (2, 4, 32)  # per query head
    # another model: other query heads, or a KV-head count that does not divide them
    for heads, kv_heads in ((8, 2), (4, 3)):
        with pytest.raises(StatsError, match="made for another model") as err:
            load_for_layout(path, dataclasses.replace(hf, num_heads=heads, num_kv_heads=kv_heads, omega=omega))
        assert "\n" not in str(err.value)


def test_a_grouped_file_is_still_refused_for_other_kv_heads(tmp_path):
    model = tiny_llama(head_dim=64, heads=4, kv_heads=2)  # its file records 2 KV heads: no broadcast
    path = tmp_path / "llama.safetensors"
    tc.calibrate(model, torch.randint(0, 128, (64,))).save(path)
    layout = tc.discover(model)
    assert load_for_layout(path, layout).tokens() == 64
    for kv_heads in (1, 4):
        with pytest.raises(StatsError, match=f"num_kv_heads: file has 2, vLLM's graph has {kv_heads}"):
            load_for_layout(path, dataclasses.replace(layout, num_kv_heads=kv_heads))
