"""Option checks shared by the commands."""
from __future__ import annotations

import click


def at_least(low: int):
    """A click callback refusing an integer below ``low`` (help text stays in the one style:
    click's IntRange would print its range after every default)."""

    def check(ctx, param, value):
        if value is not None and value < low:
            raise click.BadParameter(f"{value} is below {low}")
        return value

    return check


def named(kind: str = "file"):
    """A click callback refusing an empty name (``--config ""``, e.g. an unset shell variable),
    which would otherwise read as the option not given."""

    def check(ctx, param, value):
        if value is not None and not str(value).strip():
            from admm_onnx.errors import ConfigError

            raise ConfigError(f"{param.opts[-1]} is empty; give a {kind} name")
        return value

    return check
