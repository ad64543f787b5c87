"""The evaluation harness on a tiny random model: chunked teacher forcing, the agreement and retrieval metrics,
the report, and the ``triattn eval`` parser."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

import triattn_compile as tc
from triattn_compile.cli import main
from triattn_compile.evaluation import EvalConfig, agreement, nll, report, retrieval
from triattn_compile.evaluation.harness import PolicySwitch, distant_attention_distance
from triattn_compile.policies import make_policy


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_chunked_teacher_forcing_equals_full_attention_until_compaction():
    model = tiny_llama(layers=1)
    ids = _ids(40)
    full = nll.teacher_force(model, ids, compressed=False, chunk=16)
    tc.optimize(model, budget=64, divide_length=16, compiler="eager", policy="snapkv", protect_prompt=False)
    comp = nll.teacher_force(model, ids, compressed=True)
    assert tc.current_cache(model).rounds == 0
    torch.testing.assert_close(comp.nll, full.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(comp.pred, full.pred) and torch.equal(comp.target, ids[1:])


def test_teacher_forcing_compacts_like_a_decode():
    model = tiny_llama(layers=1)
    switch = PolicySwitch(make_policy("h2o"))
    tc.optimize(model, budget=16, divide_length=8, compiler="eager", policy=switch, protect_prompt=False)
    out = nll.teacher_force(model, _ids(60), compressed=True)
    cache = tc.current_cache(model)
    # compactions at 24, 32, 40, 48, 56 tokens; never more than budget + divide_length slots
    assert cache.rounds == 5 and cache.peak_occupancy() == 24 and cache.occupied == 20
    assert out.nll.shape == (59,) and torch.isfinite(out.nll).all()


def test_free_greedy_divergence_equals_teacher_forced_divergence():
    model = tiny_llama(seed=3)
    prompt = _ids(16, seed=1)
    cont = agreement.greedy_continuation(model, prompt, 48)
    ids = torch.cat([prompt, cont])
    assert agreement.continuation_agreement(nll.teacher_force(model, ids, compressed=False), 16)["agreement"] == 1.0
    tc.optimize(model, budget=16, divide_length=8, compiler="eager", policy="streamingllm", protect_prompt=False)
    forced = agreement.continuation_agreement(nll.teacher_force(model, ids, compressed=True), 16)
    assert forced["first_divergence"] < 48  # compression changes something in this setting
    free = agreement.free_greedy_divergence(model, ids, 16, limit=48)
    assert free == forced["first_divergence"]


class CharTokenizer:
    """One token per character (enough to place and score probe answers)."""

    def __call__(self, text, return_tensors=None):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])})()


def test_probe_places_answers_and_recall_counts_exact_digits():
    probe = retrieval.build_probe(CharTokenizer(), _ids(300), facts=3, seed=0, multiple=64)
    assert probe.ids.numel() % 64 == 0 and len(probe.answers) == 3
    codes = {"".join(chr(int(t)) for t in probe.ids[s:e]).strip() for s, e in probe.answers}
    assert codes == {c for _, c in probe.facts}
    perfect = nll.Forced(torch.zeros(probe.ids.numel() - 1), probe.ids[1:].clone(), probe.ids[1:].clone())
    assert retrieval.recall(perfect, probe) == 1.0
    s, _ = probe.answers[0]
    perfect.pred[s] = (perfect.pred[s] + 1) % 128  # one wrong digit loses that fact
    assert retrieval.recall(perfect, probe) == pytest.approx(2 / 3)


def _result() -> dict:
    rows = [{"policy": p, "budget": b, "nll": {"doc": 2.0 + 1 / b}, "top1_agreement": {"doc": 0.9},
             "continuation": {"agreement": 0.8, "first_divergence": 7}, "continuation_compressed": b < 128,
             "retrieval": 0.5, "retrieval_compressed": True}
            for p in ("triattention", "snapkv") for b in (64, 128)]
    return {"config": {"doc_tokens": 100, "calibration_tokens": 10, "continuation_tokens": 20, "prompt_tokens": 5,
                       "filler_tokens": 30},
            "model": "tiny", "sources": {"documents": {"doc": "/x/doc"}, "calibration": "pydoc-topics",
                                         "continuation_prompt": "/x/p", "probe_filler": "/x/f"},
            "first_scored_position": 50, "scored_tokens_per_document": 50, "probe_length": 64,
            "probe_facts": [["a", "1"]], "full": {"nll": {"doc": 2.0}, "retrieval": 1.0,
                                                  "continuation": {"agreement": 1.0, "first_divergence": 20}},
            "rows": rows, "free_greedy_check": None, "timing": {"total_s": 60, "full_attention_s": 1,
                                                                "calibration_s": 2}}


def test_report_tables_and_plot(tmp_path):
    text = report.markdown(_result())
    assert "| triattention" in text and "B=128" in text
    assert "0.800*" in text and "7*" in text  # B=128 never compacted the continuation: marked
    assert "2.0156" in text  # NLL at B=64 = 2 + 1/64
    report.plot(_result(), tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000
    json.dumps(_result())
    bare = _result()  # no continuation probe (--continuation-tokens 0): retrieval only
    del bare["full"]["continuation"]
    for row in bare["rows"]:
        del row["continuation"], row["continuation_compressed"]
    text = report.markdown(bare)
    assert "Greedy continuation" not in text and "Retrieval probe" in text
    report.plot(bare, tmp_path / "bare.png")


def test_eval_parser_and_config_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "--budgets" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown policies"):
        EvalConfig(policies=("nope",))
    with pytest.raises(ValueError, match="leaves nothing to score"):
        EvalConfig(doc_tokens=1000)
    # one compiled graph records one distance-filtered attention sum: the requested policies must agree on it
    with pytest.raises(ValueError, match="different minimum distances"):
        EvalConfig(policies=("triattention-lasting/min_distance=32", "triattention-lasting/min_distance=64"))
    assert distant_attention_distance(("triattention", "triattention-lasting/min_distance=32,weight=2")) == 32
    assert distant_attention_distance(("triattention", "h2o")) == 0  # nothing recorded
    with pytest.raises(ValueError, match="records it from >= 64"):
        PolicySwitch(make_policy("triattention-lasting"), distant_attention=64).scores(None)


def test_paired_difference_and_resume(tmp_path):
    base = torch.randn(512, generator=torch.Generator().manual_seed(0))
    per_token = {"a|64|doc": base + 0.5, "triattention|64|doc": base}
    mean, lo, hi = report.paired_difference(per_token, "a", "triattention", 64, ["doc"])
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert report.paired_difference(per_token, "b", "triattention", 64, ["doc"]) is None

    full = {"full|doc": base, "streamingllm|64|doc": base + 1.0}
    closed = report.gap_closed({**per_token, **full, "a|64|doc": base + 0.25}, "a", 64, ["doc"])
    assert closed == pytest.approx((0.75, 0.75, 0.75))
    assert report.gap_closed(per_token, "a", 64, ["doc"]) is None  # no full-attention tokens: no ratio

    from triattn_compile.evaluation.harness import _resumable_rows, policy_from_spec

    policy = policy_from_spec("triattention-diverse/penalty=0.5,window=64@stdlib-code:4096")
    assert (policy.name, policy.penalty, policy.window) == ("triattention-diverse", 0.5, 64)
    with pytest.raises(ValueError, match="has no option mix"):
        policy_from_spec("triattention-recent/mix=1")
    with pytest.raises(ValueError, match="not key=value"):
        policy_from_spec("triattention-recent/window")

    cfg = EvalConfig(out=tmp_path, policies=("triattention", "snapkv"), budgets=(64, 128))
    rows = [{"policy": "snapkv", "budget": 64}, {"policy": "h2o", "budget": 64}]
    (tmp_path / "results.json").write_text(json.dumps({"key": "k", "rows": rows, "timing": {"total_s": 5.0}}))
    done, earlier = _resumable_rows(cfg, "k")
    assert list(done) == [("snapkv", 64)] and earlier["previous_s"] == 5.0
    assert _resumable_rows(cfg, "other inputs") == ({}, {})


def test_merge_runs_unions_cells_and_refuses_other_inputs(tmp_path):
    from triattn_compile.evaluation.harness import merge_runs

    base = torch.randn(256, generator=torch.Generator().manual_seed(1))
    for name, budget in (("a", 64), ("b", 128)):
        res = _result()
        res["rows"] = [r for r in res["rows"] if r["budget"] == budget]
        res.update(key="k", complete=True)
        res["config"].update(policies=["triattention", "snapkv"], budgets=[budget])
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        torch.save({"key": "k", "full|doc": base, f"triattention|{budget}|doc": base + budget / 64,
                    f"snapkv|{budget}|doc": base}, tmp_path / name / "per_token.pt")
    merged = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [(r["policy"], r["budget"]) for r in merged["rows"]] == [
        ("triattention", 64), ("snapkv", 64), ("triattention", 128), ("snapkv", 128)]
    assert merged["config"]["budgets"] == [64, 128] and merged["timing"]["total_s"] == 120
    text = (tmp_path / "m" / "results.md").read_text()
    assert "-2.000 [-2.000, -2.000]" in text  # snapkv - triattention at B=128, from the second run's tokens
    other = json.loads((tmp_path / "b" / "results.json").read_text())
    (tmp_path / "b" / "results.json").write_text(json.dumps({**other, "key": "other"}))
    with pytest.raises(ValueError, match="scored different inputs"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
