"""argparse internals (the standard library's). Checked on Python 3.11."""

from __future__ import annotations

import argparse


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option the parser knows, argument groups included (``ArgumentParser._actions``: no public listing)."""
    return list(parser._actions)


def long_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` the parser knows, so an unknown flag can be refused before parsing and the nearest known
    one named."""
    return [option for action in actions(parser) for option in action.option_strings if option.startswith("--")]
