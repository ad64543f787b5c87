"""Checks shared by the eviction tests of each family: the worker's recorded compactions (``TRIATTN_VLLM_RECORD``)
against the project's HF path, and its paged keys against the unmodified HF model's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import HERE, hf_python, run

from triattn_compile.config import TriAttentionConfig
from triattn_compile.schedule import Compressor
from triattn_compile.vllm.discovery import layout_from_dict
from triattn_compile.vllm.statsfile import load_for_layout

LAYER_FIELDS = ("index", "pairing", "key_pairing", "rotary_dim", "rotary_start", "window", "key_dim", "value_dim")


def layout_equals_hf_discovery(found: dict, hf_layout: dict) -> None:
    """The layout discovery found in vLLM's graph (``VllmLayout.as_dict``) is the HF discovery's of the same
    checkpoint: heads, per-layer rotary form and widths, and ω (HF reads the float32 ``inv_freq``; where vLLM's graph
    only has a float32 cos/sin table, ω is fitted over 1024 positions: 1e-7 relative)."""
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "attention_scaling"):
        assert found[key] == hf_layout[key], key
    assert [{k: layer[k] for k in LAYER_FIELDS} for layer in found["layers"]] == [
        {k: layer[k] for k in LAYER_FIELDS} for layer in hf_layout["layers"]]
    torch.testing.assert_close(torch.tensor(found["omega"], dtype=torch.float64),
                               torch.tensor(hf_layout["omega"], dtype=torch.float64), rtol=1e-7, atol=0)
    assert all(layer["attention"] == "vllm" for layer in found["layers"])


def keep_sets_equal_the_hf_path(report: dict, stats_file: Path, budget: int, protect_prompt: bool = True) -> list[dict]:
    """Each recorded compaction (vLLM's paged keys, positions, prompt, round) compacted by the HF path's
    ``Compressor`` keeps the same slots per KV head as vLLM's worker did; returns the records."""
    layout = layout_from_dict(report["layout"]).layout
    config = TriAttentionConfig(budget=budget, protect_prompt=protect_prompt)
    compressor = Compressor(config, layout, torch.device("cpu"))
    compressor.stats = load_for_layout(stats_file, layout)
    records = report["compaction"][0]["records"]
    for record in records:
        keys, values = ([torch.tensor(x) for x in record[name]] for name in ("keys", "values"))
        n = keys[0].shape[1]
        cache = compressor.new_cache(1, torch.device("cpu"), torch.float32)
        for i, k, v in zip(record["layers"], keys, values):  # the scored layers (not the sliding-window ones)
            cache.layers[i].keys[0, :, :n], cache.layers[i].values[0, :, :n] = k, v
        cache.slot_pos[:, 0, :, :n] = torch.tensor(record["positions"])[0]
        # the HF cache counts a prompt only where it is protected (CompressedCache.record_write)
        cache.fill[0], cache.prompt[0] = n, record["prompt"] if protect_prompt else 0
        cache.row_rounds[0] = record["round"]
        cache.seen = record["position"]
        kept, = compressor.compact(cache, 0)  # one budget group (one budget in every layer)
        assert kept.tolist() == record["keep"], json.dumps(record["position"])
    return records


def paged_keys_are_the_hf_models_keys(engine_run: dict, model_dir: Path, workdir: Path, budget: int,
                                      count: int = 2) -> None:
    """The keys the worker gathered from vLLM's paged cache for ``count`` first compactions (positions
    0 .. B + 127 of a request, in order) equal the post-RoPE keys the unmodified HF model caches for the same tokens
    (main venv, float32)."""
    records = [r for r in engine_run["reports"][0]["compaction"][0]["records"] if r["round"] == 0][:count]
    by_prompt = {len(p): p + o for p, o in zip(engine_run["prompt_token_ids"], engine_run["outputs"])}
    ids = [by_prompt[r["prompt"]][: r["position"]] for r in records]
    assert len(records) == count and all(len(x) == budget + 128 for x in ids)
    for r in records:  # round 0 gathers every position in order
        assert r["positions"][0][0] == list(range(budget + 128))
    name = model_dir.name
    (workdir / f"{name}-ids.json").write_text(json.dumps(ids))
    done = run([hf_python(), str(HERE / "hf_reference.py"), str(model_dir), str(workdir / f"{name}-hf-keys.json"),
                "--keys", str(workdir / f"{name}-ids.json")])
    assert done.returncode == 0, done.stderr[-3000:]
    for record, hf in zip(records, json.loads((workdir / f"{name}-hf-keys.json").read_text())):
        for layer, paged in zip(record["layers"], record["keys"]):
            reference = hf[layer]
            torch.testing.assert_close(torch.tensor(paged), torch.tensor(reference), rtol=1e-4, atol=1e-4,
                                       msg=lambda m, layer=layer: f"layer {layer}: {m}")
