"""The README's examples, run as they are written.

``python`` blocks: each runs alone (a fresh namespace; it must import what it uses) in
a temporary working directory; a traceback points at the README's own line numbers.

``console`` blocks: every ``$ vlora ...`` line of all of them runs in bash, in order, in
one temporary directory, with ``E`` set by the README's own ``E=$(...)`` line,
``COLUMNS=200`` (so that rich wraps no line) and one thread (the same last digits on
every machine). Each must exit 0, and each output line the README shows under it must
be a line of its real output (stdout and stderr together; tables' rows are lines),
whitespace collapsed. A ``# comment`` after a command is not part of it.

What a sample may leave out (the rule ``--update`` keeps):

* a ``...`` line stands for lines the README skips: those above it are the command's
  first output lines, those below it its last ones;
* a command with a trailing ``# comment`` shows only the end of its output: as many
  last lines as the README shows (none shown: none kept);
* otherwise a sample is the command's whole output.

After the CLI's output changed, ``python tests/test_readme.py --update`` reruns the
console blocks and rewrites their samples in README.md by that rule (review the diff).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
COLUMNS = "200"
BLOCK = re.compile(r"^```(python|console)\n(.*?)^```", re.S | re.M)
COMMENT = re.compile(r"\s+#.*$")


@dataclass
class Command:
    line: str                  # as written, comment included
    sample: list[str] = field(default_factory=list)  # the output lines shown under it

    @property
    def command(self) -> str:
        return COMMENT.sub("", self.line[2:]).strip()

    @property
    def tail_only(self) -> bool:
        return bool(COMMENT.search(self.line[2:]))


def blocks(text: str, kind: str) -> list[tuple[int, str]]:
    """``(line number of the block's first line, body)`` of each ``kind`` block."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in BLOCK.finditer(text) if m.group(1) == kind]


def commands(body: str) -> list[Command]:
    cmds: list[Command] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            cmds.append(Command(line))
        elif cmds:
            cmds[-1].sample.append(line)
    return cmds


def normalize(line: str) -> str:
    return " ".join(line.split())


def shown(sample: list[str], tail_only: bool, output: list[str]) -> list[str]:
    """The lines of ``output`` a sample shaped like ``sample`` keeps (the module's rule)."""
    if "..." in sample:
        i = sample.index("...")
        head, tail = i, len(sample) - i - 1
        if head + tail >= len(output):
            return output
        return output[:head] + ["..."] + (output[len(output) - tail:] if tail else [])
    if tail_only:
        return output[len(output) - len(sample):] if sample else []
    return output


def examples_env(text: str, cwd: Path) -> dict[str, str]:
    """The environment the console blocks run in: ``E``, a copy in ``cwd`` of the folder the
    README's line names. A subspace's manifest records where each adapter was read from, so
    the bytes on disk that the samples show depend on that path's length: a copy under the
    temporary directory has the same path length on every machine (with ``/tmp``)."""
    setter = re.search(r"`(E=\$\(.*?\))`", text)
    assert setter, "README.md no longer says how to set E"
    env = {**os.environ, "COLUMNS": COLUMNS, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    value = subprocess.run(["bash", "-c", f'{setter.group(1)} && printf %s "$E"'], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert value and Path(value).is_dir(), f"{setter.group(1)} gave {value!r}"
    shutil.copytree(value, cwd / "E")
    return {**env, "E": str(cwd / "E")}


def run_console(text: str, cwd: Path) -> list[tuple[Command, int, list[str]]]:
    """Every console command of ``text`` in order: ``(command, exit code, output lines)``."""
    env = examples_env(text, cwd)
    results = []
    for _, body in blocks(text, "console"):
        for cmd in commands(body):
            done = subprocess.run(["bash", "-c", cmd.command], cwd=cwd, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            lines = [line.rstrip() for line in done.stdout.splitlines()]
            while lines and not lines[-1]:
                lines.pop()
            results.append((cmd, done.returncode, lines))
    return results


def update(path: Path = README) -> None:
    """Rewrite each console sample of ``path`` with its command's real output."""
    text = path.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        results = iter(run_console(text, Path(tmp)))

    def rewrite(m: re.Match) -> str:
        if m.group(1) != "console":
            return m.group(0)
        out = []
        for cmd in commands(m.group(2)):
            _, code, lines = next(results)
            if code:
                print(f"warning: `{cmd.command}` exited {code}:\n" + "\n".join(lines))
            out += [cmd.line, *shown(cmd.sample, cmd.tail_only, lines)]
        return "```console\n" + "\n".join(out) + "\n```"

    path.write_text(BLOCK.sub(rewrite, text))


# ------------------------------------------------------------------------ tests
TEXT = README.read_text()
PYTHON_BLOCKS = blocks(TEXT, "python")


def test_the_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 2 and sum(len(commands(b)) for _, b in blocks(TEXT, "console")) >= 5


@pytest.mark.parametrize(("start", "body"), PYTHON_BLOCKS,
                         ids=[f"line{start}" for start, _ in PYTHON_BLOCKS])
def test_python_block_runs(start, body, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile("\n" * (start - 1) + body, str(README), "exec")  # README's line numbers
    exec(code, {"__name__": "__readme__"})


def test_console_blocks_print_what_the_readme_shows():
    problems = []
    with tempfile.TemporaryDirectory() as tmp:  # the path length --update had (see examples_env)
        results = run_console(TEXT, Path(tmp))
    for cmd, code, lines in results:
        real = {normalize(line) for line in lines}
        missing = [line for line in cmd.sample
                   if line.strip() not in ("", "...") and normalize(line) not in real]
        if code or missing:
            problems.append(f"$ {cmd.command}\n  exit code {code}\n"
                            + "".join(f"  missing: {line}\n" for line in missing)
                            + "  real output:\n" + "".join(f"    {line}\n" for line in lines))
    assert not problems, ("the README's console samples differ from the real output "
                          "(`python tests/test_readme.py --update` rewrites them):\n\n"
                          + "\n".join(problems))


def test_the_update_rule_keeps_what_the_readme_elides():
    out = [f"line {i}" for i in range(6)]
    assert shown(["a", "..."], False, out) == ["line 0", "..."]
    assert shown(["a", "...", "b"], True, out) == ["line 0", "...", "line 5"]
    assert shown(["a"], True, out) == ["line 5"]
    assert shown([], True, out) == []
    assert shown(["a", "b"], False, out) == out
    assert shown(["a", "...", "b", "c", "d", "e", "f"], False, out) == out


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_readme.py --update")
    update()
