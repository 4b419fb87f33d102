"""argparse internals (the standard library's). Checked on Python 3.11."""

from __future__ import annotations

import argparse


def long_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` the parser knows, argument groups included (``ArgumentParser._actions``: no public
    listing), so an unknown flag can be refused before parsing and the nearest known one named."""
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
