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
    tc.calibrate(tiny_llama(), torch.randint(0, 128, (700,))).save(path)
    return path


def _signature(model) -> tc.RotarySignature:
    return tc.inspect(tc.optimize(model, budget=256, compiler="eager")).layout.signature


def test_roundtrip_and_metadata(stats_file):
    model = tiny_llama()
    stats = tc.calibrate(model, torch.randint(0, 128, (700,)))
    assert stats.tokens() == 700
    loaded = tc.QueryStats.load(stats_file, stats.signature)
    assert loaded.tokens() == 700
    assert loaded.q_mean().shape == (2, 4, 8)
    assert bool((loaded.q_abs() >= loaded.q_mean().abs() - 1e-6).all())  # E|q| >= |E q|
    with open(stats_file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    assert meta["pairing"] == "half" and meta["num_kv_heads"] == "2" and meta["tokens"] == "700"
    assert (meta["documents"], meta["contexts"], meta["context_length"]) == ("1", "1", "8192")


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


def _docs(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g) for n in lengths]


def _pooled(*parts: tc.QueryStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted means of several runs' statistics (q̄, E|q|)."""
    n = sum(p.count for p in parts)[:, None, None]
    return (sum(p.q_mean() * p.count[:, None, None] for p in parts) / n,
            sum(p.q_abs() * p.count[:, None, None] for p in parts) / n)


def _close(stats: tc.QueryStats, q_mean: torch.Tensor, q_abs: torch.Tensor, rtol: float = 1e-5) -> bool:
    rel = max(((stats.q_mean() - q_mean).norm() / q_mean.norm()).item(), ((stats.q_abs() - q_abs).norm() /
                                                                           q_abs.norm()).item())
    return rel <= rtol


def test_documents_are_separate_contexts_never_joined():
    model = tiny_llama()
    a, b = _docs(300, 200)
    both = tc.calibrate(model, [a, b])
    assert both.tokens() == 500 and both.report.documents == 2 and both.report.contexts == 2
    assert _close(both, *_pooled(tc.calibrate(model, a), tc.calibrate(model, b)))
    joined = tc.calibrate(model, torch.cat([a, b]))
    assert not _close(joined, both.q_mean(), both.q_abs(), rtol=1e-3)  # b's queries see a in the joined text


def test_memory_chunks_equal_one_pass():
    model = tiny_llama()
    docs = _docs(700, 130, 1)
    whole = tc.calibrate(model, docs)
    chunked = tc.calibrate(model, docs, memory_chunk=64)
    report = chunked.report
    assert report.cache_carried and report.tokens_per_pass == 64 and report.contexts == 3
    assert report.forward_passes == 11 + 3 + 1  # 700 = 10 x 64 + 60, 130 = 2 x 64 + 2, 1
    assert _close(chunked, whole.q_mean(), whole.q_abs())


def test_long_document_runs_as_consecutive_contexts():
    model = tiny_llama()
    (doc,) = _docs(600)
    stats = tc.calibrate(model, doc, context_length=256)
    report = stats.report
    assert (report.contexts, report.split_documents, report.longest_context) == (3, 1, 256)
    assert "split into consecutive contexts" in report.describe()
    windows = tc.calibrate(model, list(doc.split(256)))  # three documents (each its own context)
    assert _close(stats, windows.q_mean(), windows.q_abs())
    assert not _close(stats, *_pooled(tc.calibrate(model, doc)), rtol=1e-3)


def test_default_context_is_the_models():
    model = tiny_llama()
    model.config.max_position_embeddings = 100
    stats = tc.calibrate(model, _docs(250))
    assert (stats.report.context_length, stats.report.contexts) == (100, 3)


def _one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("ids, kwargs, says", [
    (torch.zeros(2, 50, dtype=torch.long), {}, "list of 1-D tensors"),
    (torch.zeros(50), {}, "integer token ids"),
    ([], {}, "no documents"),
    ([torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long)], {}, "document 1 is empty"),
    (torch.zeros(1, dtype=torch.long), {}, "at least 2 tokens"),
    (torch.zeros(50, dtype=torch.long), {"context_length": 0}, "positive number of tokens"),
    (torch.zeros(50, dtype=torch.long), {"context_length": 10_000}, "use at most 8192"),
    (torch.zeros(50, dtype=torch.long), {"memory_chunk": 0}, "positive number of tokens per forward pass"),
])
def test_bad_input_is_one_line(ids, kwargs, says):
    with pytest.raises(ValueError) as exc:
        tc.calibrate(tiny_llama(), ids, **kwargs)
    assert says in _one_line(exc)


class _PlainDecoder(torch.nn.Module):
    """A decoder without a config: called with ``past_key_values`` and positions (the plain PyTorch convention)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=False):
        return self.inner(input_ids=input_ids, position_ids=position_ids, cache=past_key_values, use_cache=use_cache)


def test_model_without_a_context_length_needs_one():
    model = _PlainDecoder(tiny_llama())
    doc = _docs(40)[0]
    with pytest.raises(ValueError) as exc:
        tc.calibrate(model, doc)
    assert "pass context_length=" in _one_line(exc)
    whole = tc.calibrate(model, doc, context_length=40)
    assert whole.report.contexts == 1 and _close(whole, *_pooled(tc.calibrate(model.inner, doc)))
    chunked = tc.calibrate(model, doc, context_length=40, memory_chunk=16)  # a cache without a config
    assert chunked.report.cache_carried and _close(chunked, whole.q_mean(), whole.q_abs())


class _ByteTokenizer:
    """Token ids = bytes of the text modulo the tiny vocabulary."""

    def __call__(self, text, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[b % 128 for b in text.encode()]], dtype=torch.long))


def test_cli_one_document_per_file_and_says_what_it_did(tmp_path, monkeypatch, capsys):
    import triattn_compile.loading as loading
    from triattn_compile.cli import main

    monkeypatch.setattr(loading, "load_model", lambda source, dtype: (tiny_llama(), _ByteTokenizer()))
    files = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
    for f, n in zip(files, (300, 100, 50)):
        f.write_text("x" * n)
    out = tmp_path / "s.safetensors"
    args = ["calibrate", "--text", *map(str, files), "--tokens", "350", "--context-length", "256", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["tokens"], result["documents"], result["contexts"], result["split_documents"]) == (350, 2, 3, 1)
    assert result["cut at --tokens"] == [f"{files[1]} (first 50 of 100 tokens)"]
    assert result["left out by --tokens"] == [str(files[2])]
    assert tc.QueryStats.load(out, tc.discover(tiny_llama()).signature).tokens() == 350
    assert main([*args, "--memory-chunk", "64"]) == 0
    text = capsys.readouterr().out
    assert "calibrated on: 350 tokens from 2 documents in 3 continuous contexts" in text
    assert "carrying each context's KV cache" in text


def test_cli_empty_file_is_one_line_error(tmp_path, monkeypatch, capsys):
    import triattn_compile.loading as loading
    from triattn_compile.cli import main

    monkeypatch.setattr(loading, "load_model", lambda source, dtype: (tiny_llama(), _ByteTokenizer()))
    (tmp_path / "empty.txt").write_text("")
    code = main(["calibrate", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "holds no text" in err


def _tiny(family: str):
    """A random 2-layer model of ``family`` with 4 query heads (2 KV heads where the family has GQA)."""
    import transformers as T

    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 8192}
    windowed = {**common, "sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"]}
    config_class, model_class, config = {
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, windowed),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, windowed),
        "cohere2": (T.Cohere2Config, T.Cohere2ForCausalLM, {**windowed, "head_dim": None}),
        "gptj": (T.GPTJConfig, T.GPTJForCausalLM, {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                  "rotary_dim": 8, "n_positions": 8192}),
    }[family]
    torch.manual_seed(0)
    config = config_class(**{k: v for k, v in config.items() if v is not None})
    config._attn_implementation = "eager"  # Gemma-2's soft-capping runs in eager attention only
    return model_class(config).eval()


@pytest.mark.parametrize("family, kv_heads", [("gemma2", 2), ("gemma3", 2), ("cohere2", 2), ("gptj", 4)])
def test_calibrates_families_it_once_refused(family, kv_heads):
    """Calibration compresses nothing, so a sliding window wider than any budget is fine (Gemma-3: 4,096, was refused
    against the default budget); Gemma-2's eager attention with tanh soft-capping is found when its scale and cap
    are traced as symbolic floats (``dynamic=True``; was "no attention node found"); with no cache in the graph the
    KV heads are followed back from the attention's key operand (GPT-J rotates its keys ``[B, S, H, D]`` before
    transposing them, Cohere-2's NoPE layer only transposes the projection: both read the sequence axis as heads)."""
    model = _tiny(family)
    stats = tc.calibrate(model, torch.randint(3, 128, (40,)))
    assert stats.tokens() == 40 and bool(stats.count.eq(40).all())
    assert stats.signature.num_kv_heads == kv_heads and stats.signature.num_heads == 4
