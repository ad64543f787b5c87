"""Discovery on vLLM's graph equals the project's HF discovery of the same checkpoint; the paged KV tensors vLLM
allocated are found under the discovered layer names."""

from __future__ import annotations

import json

from checks import layout_equals_hf_discovery
from safetensors import safe_open


def _report(triattn_run) -> dict:
    assert len(triattn_run["reports"]) == 1  # one CPU worker
    return triattn_run["reports"][0]


def test_layout_equals_hf_discovery(triattn_run, hf_layout):
    layout_equals_hf_discovery(_report(triattn_run)["layout"], hf_layout)


def test_layer_names_key_the_paged_cache(triattn_run, hf_layout):
    report = _report(triattn_run)
    names = [layer["layer_name"] for layer in report["layout"]["layers"]]
    assert len(set(names)) == hf_layout["num_layers"]
    for name in names:  # CPU_ATTN: [num_blocks, num_kv_heads, block_size, 2 * head_dim] (K rows, then V rows)
        shape = report["paged"][name]["kv_shape"]
        assert shape[1:] == [hf_layout["num_kv_heads"], report["block_size"], 2 * hf_layout["head_dim"]], shape


def test_statistics_of_the_same_model_are_loaded(triattn_run, stats_file):
    with safe_open(str(stats_file), framework="pt") as fh:
        tokens = int(fh.metadata()["tokens"])
    assert tokens > 0
    assert _report(triattn_run)["stats_tokens"] == tokens


def test_the_engine_compiled_through_the_plugin(triattn_run, plain_run):
    assert triattn_run["backend"] == "triattn_compile.vllm.backend.inductor"
    assert plain_run["backend"] == "inductor" and plain_run["reports"] is None
    json.dumps(_report(triattn_run))  # the report is plain JSON
