"""Shared helper for command-line tests: a user mistake is one ``error:`` line, exit 2, no traceback."""

from __future__ import annotations

import pytest

from neuralode.cli import main


def usage_error(capsys, *argv: str) -> str:
    """Run ``neuralode argv`` in-process, expect exit status 2, return its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    return err
