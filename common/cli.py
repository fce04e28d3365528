"""What every ``python -m`` command shares: a --help that starts nothing, and AWS failures told in
one line (exit status 1) instead of a traceback, bad settings too (exit status 2)."""
from __future__ import annotations

import datetime as dt
import math
import sys
from collections.abc import Callable

import click

from common import aws
from common.config import ConfigError

# Every command: -h as well as --help, and each option's default shown in its help.
CLI_CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def iso_time(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """A click callback: an ISO time, UTC unless it says so; None when the option is not given."""
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO time such as 2026-12-06T10:00 (UTC unless it says), "
                                 f"got {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


class FiniteRange(click.FloatRange):
    """``click.FloatRange`` that refuses nan and inf as well: nan passes every bound (it fails every
    comparison), and inf any range open above, and either then breaks the command's arithmetic."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _AwsErrorsInOneLine:
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except aws.ERRORS as exc:
            raise click.ClickException(aws.explain(exc)) from None
        except ConfigError as exc:
            raise ConfigFailed(exc) from None


class ConfigFailed(click.ClickException):
    """A bad setting, told in one line with the key as set; exit status 2, as every component's start."""

    exit_code = 2

    def __init__(self, error: Exception):
        super().__init__(f"config error: {error}")


class AwsCommand(_AwsErrorsInOneLine, click.Command):
    """A click command whose AWS failures end in one clear line."""


class AwsGroup(_AwsErrorsInOneLine, click.Group):
    """A click group whose subcommands' AWS failures end in one clear line."""


def run_command(main: Callable[[], int], exit: Callable[[int], None] = sys.exit) -> None:
    """Run ``main`` as a command line whose ``--help`` prints its docstring and starts nothing."""
    @click.command(cls=AwsCommand, help=main.__doc__, context_settings=CLI_CONTEXT)
    def command() -> None:
        exit(main())

    command()
