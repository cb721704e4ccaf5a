"""The ``supermask`` command line: --help texts and one-line errors."""

from __future__ import annotations

import re

import pytest

from service import cli


@pytest.mark.parametrize("command", ["train", "evaluate", "inspect", "serve"])
def test_help_explains_every_option_without_none_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert not re.search(r"\(default:[^)]*\)\s*\(default:", out)  # never two defaults on one option
    if command == "train":
        assert "--mask-lr MASK_LR" in out and "(default: 0.1)" in out
        assert "training examples per optimizer step" in out


def test_inspect_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.smask")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("supermask inspect: error:") and "\n" not in err
