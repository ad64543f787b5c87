"""The ``triattn`` command line: help texts and one-line errors."""

from __future__ import annotations

import pytest

from triattn_compile.cli import main


@pytest.mark.parametrize("command", [[], ["calibrate"], ["generate"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out


def test_missing_model_is_one_line_error(capsys, tmp_path):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "not found" in err


def test_empty_bench_context_is_one_line_error(capsys):
    code = main(["bench", "--length", "0", "--contexts", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "at least 1 token" in err


def test_bench_tables_keep_the_rows_of_a_run_cut_short(tmp_path):
    from triattn_compile.cli import _write_rows

    def rows():
        yield {"method": "sdpa", "ms/step": 12.5}
        yield {"method": "B=1024", "ms/step": 3.25}
        raise KeyboardInterrupt  # the run is killed while measuring the third row

    path = tmp_path / "contexts.md"
    with pytest.raises(KeyboardInterrupt):
        _write_rows(rows(), "title", path, "triattn bench", quiet=True)
    table = path.read_text()
    assert "12.5" in table and "3.25" in table


class _WordTokenizer:
    """Stands in for a chat tokenizer: one token per word."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(int(i)) for i in ids)


def test_generate_from_a_prompt_file_longer_than_the_budget(monkeypatch, capsys, tmp_path):
    """``--prompt-file`` with a prompt longer than the cache: refused in one line with the prompt protected (the
    default, naming the option), generated in pieces with ``--no-protect-prompt``."""
    import functools
    import json

    import torch
    from conftest import tiny_llama

    import triattn_compile as tc
    from triattn_compile import loading

    model = tiny_llama()
    monkeypatch.setattr(loading, "load_model", lambda name, dtype: (model, _WordTokenizer()))
    monkeypatch.setattr(loading, "chat_ids", lambda tok, text: torch.tensor([[hash(w) % 128 for w in text.split()]]))
    monkeypatch.setattr(tc, "optimize", functools.partial(tc.optimize, compiler="eager"))  # no Inductor build here
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"w{i}" for i in range(300)))
    command = ["generate", "--prompt-file", str(prompt), "--budget", "128", "--max-new-tokens", "8", "--json"]

    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "prompt of 300 tokens does not fit budget 128" in err and "protect_prompt" in err
    tc.restore(model)
    assert main([*command, "--no-protect-prompt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 8 and out["peak_kv_slots"] == 256 and out["compactions"] >= 1
    assert main(["generate", "--budget", "128"]) == 2 and "--prompt TEXT or --prompt-file" in capsys.readouterr().err
