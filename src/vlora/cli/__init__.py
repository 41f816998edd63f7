"""The ``vlora`` command line. Exit codes: 0 success, 1 a failed check, 2 bad usage or input.

Errors are one line on stderr (``--debug``, before or after the command's name, shows
the traceback); warnings are ``vlora: warning: ...`` lines there, each once, and ``-q``
keeps them. Files are written only at the end of a command, atomically: an interrupted
command leaves what was there.
"""

from __future__ import annotations

import sys

import click

from vlora.cli.adapter_cmds import analyze, merge_cmd
from vlora.cli.common import VLoRAGroup
from vlora.cli.demo import demo
from vlora.cli.report_cmds import benchmark, plot
from vlora.cli.serve import serve
from vlora.cli.subspace_cmds import add, compress, diff, export, info, remove, validate


@click.group(cls=VLoRAGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlora", prog_name="vlora")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """vlora: many LoRA adapters of one base model as one shared subspace.

    \b
    Typical session:
      vlora compress adapters/* -o sub --variance-threshold 0.9
      vlora info sub
      vlora export sub my-task -o my-task-lora
      vlora add sub new-adapter/
    """
    ctx.obj = {"debug": debug}


for command in (compress, info, export, add, remove, validate, diff, analyze, merge_cmd, plot,
                benchmark, demo, serve):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="vlora")


if __name__ == "__main__":
    sys.exit(main())
