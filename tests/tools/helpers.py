"""Assertions the command-line tools' tests share."""

from __future__ import annotations

import argparse


def one_error_line(err: str) -> str:
    """The single ``error:`` line of a tool's stderr; fails on a traceback or several lines."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def assert_all_flags_have_help(parser: argparse.ArgumentParser) -> None:
    """Every option and positional argument of ``parser`` carries help text."""
    missing = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"flags without help: {missing}"
