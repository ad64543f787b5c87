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
