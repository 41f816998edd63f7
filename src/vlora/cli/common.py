"""What every vlora command shares: error handling, sizes, output helpers."""

from __future__ import annotations

import json
import math
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from vlora import progress
from vlora.errors import VLoRAError
from vlora.io import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from vlora.storage import MANIFEST

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


# Library messages name Python arguments; on the command line the same choice is a flag.
_FLAG_HINTS = {"missing_modules='skip' or 'zero'": "--missing-modules skip (or zero)"}


class VLoRAGroup(click.Group):
    """Runs each command with one progress bar and warnings as ``vlora: warning: ...`` lines
    (each once), and turns our exceptions, and click's usage errors, into a one-line error
    and exit code 2. Every command takes ``--debug`` too (after its name)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False,
                                       callback=_set_debug, help="Show full tracebacks on errors."))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings(), progress.session():
                _print_warnings_once()
                return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"vlora: error: {e.format_message()} (see '{where} --help')", err=True)
            ctx.exit(2)
        except (VLoRAError, ValueError, OSError) as e:
            if (ctx.obj or {}).get("debug"):
                traceback.print_exc()
            click.echo(f"vlora: error: {for_the_cli(str(e))}", err=True)
            ctx.exit(2)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        root = ctx.find_root()
        root.obj = {**(root.obj or {}), "debug": True}


def _print_warnings_once() -> None:
    """Inside ``catch_warnings``: every UserWarning reaches the handler (not once per code
    line, Python's default), which prints each distinct message once on stderr."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = for_the_cli(str(message))
        if text not in seen:
            seen.add(text)
            click.echo(f"vlora: warning: {text}", err=True)

    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = show


def for_the_cli(message: str) -> str:
    """A library message with its Python-argument hints put as the command line's flags."""
    for python, flag in _FLAG_HINTS.items():
        message = message.replace(python, flag)
    return message


def parse_size(text: str) -> int:
    """``20MB``, ``1.5GiB``, ``300000``, ``1e6`` -> bytes (at least 1)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 20MB, 1.5GiB or 300000")
    size = float(m[1]) * _UNITS[m[2].upper()]
    if not 1 <= size < 2 ** 63:
        raise click.BadParameter(f"{text!r}: a size is at least 1 byte (and finite)")
    return int(size)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def split_ids(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def console(quiet: bool = False) -> Console:
    return Console(quiet=quiet, highlight=False)


def print_json(data: Any) -> None:
    """Strict JSON on stdout: an infinite or NaN number (a task missing a module has an
    infinite relative difference) is written as null, which every parser reads."""
    click.echo(json.dumps(_finite(data), indent=2, sort_keys=True, default=float, allow_nan=False))


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# -q keeps warnings: some are the only word of a possible silent loss (adapters of
# different base models, modules counted as zero).
QUIET = click.option("-q", "--quiet", is_flag=True,
                     help="Print nothing but warnings and errors.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def check_adapter_output(path: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse to write an adapter over a file, into a subspace folder, onto one of the
    command's own ``inputs``, or (without ``force``) over an adapter already there: it may
    be an original. Other files of an existing folder are kept (save_adapter replaces only
    the adapter's own files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise click.UsageError(f"{path}: exists and is not a folder")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():  # else found only when writing, at the end
        raise click.UsageError(f"{path}: {above} is a file, not a folder")
    if (path / MANIFEST).exists():
        raise click.UsageError(f"{path}: a vlora subspace folder; write the adapter elsewhere")
    if path.exists() and any(path.resolve() == Path(p).resolve() for p in inputs):
        raise click.UsageError(f"{path}: one of this command's inputs; write the result elsewhere")
    held = [n for n in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME) if (path / n).exists()]
    if held and not force:
        raise click.UsageError(f"{path}: holds an adapter already ({', '.join(held)}); "
                               "pass --force to replace it")
