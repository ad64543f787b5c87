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
