"""Build cost on the LLM test bed: ``vlora compress`` of all 41 adapters, batch and streaming.

Each build is one ``vlora compress`` process timed by ``/usr/bin/time`` (wall seconds and
peak resident memory, what a user's machine would see), writing to a temporary folder
whose size on disk is reported beside the adapters' own:

* batch, ``-k 32``: one fixed-k shared fit;
* streaming, ``--streaming -k 32``: adapters read a chunk at a time;
* with ``--ratio``: batch, ``--ratio 10 --bits 6``, the byte search over shared, private
  and hybrid fits (far longer: it fits the adapters many times).

    python -m benchmarks.llm_build
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import commit
from vlora.testbed import llm

RESULTS = Path(__file__).parent / "results"
BUILDS = {"streaming, -k 32": ["--streaming", "-k", "32"],
          "batch, -k 32": ["-k", "32"],
          "batch, --ratio 10 --bits 6": ["--ratio", "10", "--bits", "6"]}


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def build(dirs: list[Path], options: list[str], out: Path) -> dict:
    vlora = [sys.executable, "-c", "from vlora.cli import main; main()"]
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *vlora, "compress", *map(str, dirs),
                           "-o", str(out), *options], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"vlora compress {' '.join(options)} failed:\n{proc.stderr[-2000:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return {"seconds": float(seconds), "peak_rss_mib": int(kib) / 1024, "folder_bytes": du(out),
            "load_average_1min_after": os.getloadavg()[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=llm.default_root())
    ap.add_argument("--ratio", action="store_true", help="also the --ratio 10 --bits 6 build")
    ap.add_argument("--name", default="llm_build")
    args = ap.parse_args(argv)
    dirs = sorted(p.parent for r in ("one-seed", "independent")
                  for p in (args.root / r).glob("*/adapter_model.safetensors"))
    out = {"adapters": len(dirs), "adapter_bytes": sum(du(d) for d in dirs), "builds": {},
           "commit": commit()}
    with tempfile.TemporaryDirectory(prefix="vlora-llm-build-") as tmp:
        for i, (name, options) in enumerate(BUILDS.items()):
            if "--ratio" in options and not args.ratio:
                continue
            out["builds"][name] = build(dirs, options, Path(tmp) / str(i))
            print(name, json.dumps(out["builds"][name]), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)  # after each build: a stopped run keeps it
            (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
            (RESULTS / f"{args.name}.md").write_text(report(out))
    print(report(out))
    return out


def report(out: dict) -> str:
    lines = ["# Building a subspace of the LLM test bed", "",
             f"`python -m benchmarks.llm_build` at {out['commit']}: `vlora compress` of the bed's "
             f"{out['adapters']} adapters ({out['adapter_bytes'] / 1e6:.1f} MB of adapter folders), "
             "one process each, wall time and peak RSS from /usr/bin/time.", "",
             "| build | seconds | peak RSS (MiB) | folder (MB) | smaller than the adapters | "
             "load average after |",
             "|---|---|---|---|---|---|"]
    for name, b in out["builds"].items():
        lines.append(f"| {name} | {b['seconds']:.0f} | {b['peak_rss_mib']:.0f} | "
                     f"{b['folder_bytes'] / 1e6:.2f} | {out['adapter_bytes'] / b['folder_bytes']:.1f}x | "
                     f"{b['load_average_1min_after']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
