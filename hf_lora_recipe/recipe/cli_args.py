"""Command-line conventions shared by every command, and the recipe parser generated from :class:`Recipe`.

Every command follows TRL's conventions: ``--key value`` with the recipe's (TRL's) key names, lists as
several values (``--lora_target_modules q_proj v_proj``; commas work too), booleans bare
(``--push_to_hub``) or with a value (``--bf16 false``), ``--config recipe.yaml`` for the file. Prefixes
of a flag are not guessed at: ``--learning_rat`` is an error naming ``--learning_rate``. Any error is one
line, ``hf-lora-recipe: error: ...``, and exit code 2. Only ``argparse`` and ``yaml`` load here, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from hf_lora_recipe.recipe.schema import (
    AUTO,
    DERIVED_KEYS,
    FIELDS,
    GROUPS,
    Bounds,
    KeyPlugins,
    Recipe,
    RecipeError,
    field_type,
    is_list,
    load_recipe,
    nearest,
    parse_bool,
    unknown_key_error,
)
from hf_lora_recipe.upstream.argparse import long_flags


ERROR_PREFIX = "hf-lora-recipe: error:"


class CommandParser(argparse.ArgumentParser):
    """argparse, with errors raised as :class:`RecipeError` and no guessing of abbreviated flags."""

    def __init__(self, command: str, description: str, epilog: str | None = None, usage: str | None = None):
        super().__init__(
            prog=f"hf-lora-recipe {command}",
            description=description,
            epilog=epilog,
            usage=usage,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.number_bounds: dict[str, Bounds] = {}  # --flag's dest -> its range (see add_number)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RecipeError(f"{self.prog}: {message}")

    def add_flag(self, *names: str, help: str, default: bool = False) -> None:  # noqa: A002 - argparse's name
        """A boolean given bare (``--private``) or with a value (``--private false``)."""
        self.add_argument(
            *names,
            nargs="?",
            const=True,
            default=default,
            type=_bool_argument,
            metavar="BOOL",
            help=f"{help} (default: {str(default).lower()})",
        )

    def add_number(
        self,
        flag: str,
        kind: type,
        bounds: Bounds,
        default: float | None,
        help: str,  # noqa: A002 - argparse's name
        metavar: str | None = None,
        auto: bool = False,
    ) -> None:
        """A numeric option with its declared range, checked by :meth:`parse` as recipe keys are checked at load:
        finite, and within ``bounds`` (the range is in --help too). ``auto``: the word ``auto`` is a value too."""
        self.add_argument(
            flag,
            type=_number_or_auto(kind) if auto else kind,
            default=default,
            metavar=metavar,
            help=f"{help} ({bounds}{' or auto' if auto else ''}; default: {default})",
        )
        self.number_bounds[flag[2:]] = bounds

    def check_numbers(self, args: argparse.Namespace) -> None:
        import math

        for name, bounds in self.number_bounds.items():
            value = getattr(args, name)
            if value is None or value == AUTO:
                continue
            if not math.isfinite(value):
                raise RecipeError(f"--{name}: {value!r} is not a finite number; give a number")
            if not bounds.holds(value):
                raise RecipeError(f"--{name} must be {bounds}; got {value}")

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """Parse ``argv``; an unknown flag is an error naming the nearest known one."""
        known = set(long_flags(self))
        for token in argv:  # before argparse, whose "required" check would otherwise hide a misspelt flag
            flag = token.partition("=")[0]
            if flag.startswith("--") and flag not in known:
                raise self.unknown_flag(flag[2:])
        args, unknown = self.parse_known_args(argv)
        if unknown:
            raise RecipeError(f"{self.prog}: unexpected argument {unknown[0]!r}: settings are given as --key value")
        self.check_numbers(args)
        return args

    def flags(self) -> list[str]:
        return [flag[2:] for flag in long_flags(self)]

    def unknown_flag(self, key: str) -> RecipeError:
        return RecipeError(f"{self.prog}: unknown flag --{key}; did you mean --{nearest(key, self.flags())}?")


def _bool_argument(value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(value) or "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


class RecipeParser(CommandParser):
    """``--config`` plus one flag per :class:`Recipe` field, grouped and documented as the dataclass is;
    ``plugins``: the keys whose values a later stage defines (their names in --help, their check at parse)."""

    def __init__(
        self,
        command: str,
        description: str,
        epilog: str | None = None,
        usage: str | None = None,
        plugins: tuple[KeyPlugins, ...] = (),
    ):
        usage = usage or f"hf-lora-recipe {command} [--config RECIPE.yaml] [--key value ...]"
        super().__init__(command, description, epilog, usage)
        self.plugins = plugins
        plugin_names = {plugin.key: plugin.names() for plugin in plugins}
        self.add_argument(
            "--config",
            metavar="RECIPE.yaml",
            help="recipe file; its keys are the flags below (flags given here override it)",
        )
        defaults = Recipe()
        groups = {title: self.add_argument_group(f"recipe keys: {title}") for title in GROUPS}
        for name, spec in FIELDS.items():
            base, _ = field_type(name)
            choices = spec.metadata.get("choices") or plugin_names.get(name)
            # argparse %-formats help strings
            bounds = f"; {spec.metadata['bounds']}" if spec.metadata.get("bounds") else ""
            help_text = f"{spec.metadata['help']} (default: {_shown(getattr(defaults, name))}{bounds})".replace(
                "%", "%%"
            )
            # SUPPRESS: only flags actually given become overrides, so the YAML's values survive
            options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
            if base is bool:
                options.update(nargs="?", const="true", metavar="BOOL")
            elif is_list(name):
                options.update(nargs="+", metavar="NAME")
            else:
                options["metavar"] = "{" + ",".join(choices) + "}" if choices else base.__name__.upper()
            groups[spec.metadata["group"]].add_argument(f"--{name}", **options)
        # TRL's scripts train full models unless told --use_peft; here LoRA is the point, so the flag is accepted
        # (TRL command lines paste in unchanged) and only its negation is refused.
        groups[GROUPS[2]].add_argument(
            "--use_peft",
            nargs="?",
            const="true",
            default=argparse.SUPPRESS,
            metavar="BOOL",
            help="accepted for TRL command lines: the adapter is always trained",
        )

    def unknown_flag(self, key: str) -> RecipeError:
        if key in DERIVED_KEYS or nearest(key, self.flags()) in FIELDS:
            return unknown_key_error(key, "on the command line")
        return super().unknown_flag(key)

    def parse_recipe(self, argv: list[str]) -> tuple[Recipe, argparse.Namespace]:
        """(the validated recipe: defaults < --config YAML < flags, the command's own options)."""
        args = self.parse(argv)
        if not parse_bool(getattr(args, "use_peft", True)):
            raise RecipeError(
                "--use_peft false: hf-lora-recipe always trains a LoRA adapter (full fine-tuning is TRL's sft)"
            )
        overrides = {name: value for name, value in vars(args).items() if name in FIELDS}
        options = argparse.Namespace(
            **{k: v for k, v in vars(args).items() if k not in FIELDS and k not in ("config", "use_peft")}
        )
        recipe = load_recipe(args.config, overrides)
        for plugin in self.plugins:
            plugin.check(recipe)
        return recipe, options


DEBUG_ENV = "HF_LORA_RECIPE_DEBUG"  # =1: show the traceback of an expected failure too


def _say_once(line: str) -> None:
    """The error line, from the main process only: under ``accelerate launch`` every rank fails the same check."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)


def command(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main``: expected failures become one ``hf-lora-recipe: error:`` line and exit code 2.

    A :class:`RecipeError` is a failure the user can fix (the message says how); anything else is a bug and
    keeps its traceback. ``HF_LORA_RECIPE_DEBUG=1`` shows the traceback for the expected ones as well.
    """

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        from hf_lora_recipe.upstream.notices import quiet_libraries

        quiet_libraries()
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except RecipeError as error:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _say_once(f"{ERROR_PREFIX} {error}")
            return 2
        except BrokenPipeError:
            # `... | head`: the reader left; say nothing more, and keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            _say_once(f"{ERROR_PREFIX} interrupted")
            return 130
        except Exception as error:  # noqa: BLE001 - a refused write is one line; anything else keeps its traceback
            from hf_lora_recipe.files import disk_full_line
            from hf_lora_recipe.upstream.transformers import tokenizers_os_error

            # a tokenizer saved inside a library call (Trainer's checkpoint) fails with tokenizers' bare Exception
            os_error = error if isinstance(error, OSError) else tokenizers_os_error(error, "")
            line = disk_full_line(os_error) if os_error is not None else None
            if line is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _say_once(f"{ERROR_PREFIX} {line}")
            return 2

    return run


def _number_or_auto(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return AUTO if text == AUTO else kind(text)

    parse.__name__ = f"{kind.__name__} or {AUTO}"  # argparse names the expected type by it
    return parse
