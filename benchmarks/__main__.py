"""The benchmark suite: ``python -m benchmarks all`` (or ``quick``) writes benchmarks/RESULTS.md.

Each part also runs alone (``python -m benchmarks.fidelity --help`` ...). ``quick`` uses
the adapters shipped with vlora and small sizes so it finishes in a few minutes (CI
runs it so the harness never rots; CI checks that it runs, not that numbers hold).
``all`` trains the test bed once per machine (cached under ``--testbed``, outside the
suite's time) and runs every part at full size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def run(module: str, *args: str) -> float:
    start = time.perf_counter()
    print(f"== python -m benchmarks.{module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], check=True, cwd=HERE.parent)
    return time.perf_counter() - start


def lanes(*lanes_: list[tuple[str, ...]]) -> dict[str, float]:
    """Run each lane (parts one after another) in its own process, the lanes side by side:
    one core each. Returns seconds per part."""
    import concurrent.futures as cf

    def lane(parts):
        return {part[0]: run(*part) for part in parts}
    with cf.ThreadPoolExecutor(len(lanes_)) as pool:
        done = [f.result() for f in [pool.submit(lane, parts) for parts in lanes_]]
    return {k: v for d in done for k, v in d.items()}


def testbed_dirs(root: Path, regime: str) -> list[str]:
    return sorted(str(p.parent) for p in (root / regime).glob("*/adapter_model.safetensors"))


def machine() -> str:
    import torch

    import vlora
    lines = [f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
             f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}",
             f"- torch {torch.__version__} ({torch.get_num_threads()} threads), vlora {vlora.__version__}"]
    for pkg in ("transformers", "peft"):
        with contextlib.suppress(ImportError):
            lines.append(f"- {pkg} {__import__(pkg).__version__}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["all", "quick"])
    ap.add_argument("--testbed", default=str(Path.home() / ".cache" / "vlora" / "bench-testbed"),
                    help="test-bed cache (``all`` trains what is missing; see benchmarks/testbed.py)")
    args = ap.parse_args(argv)
    quick = args.mode == "quick"
    testbed_s = 0.0
    if quick:
        from vlora.examples import example_adapter_dirs
        dirs = [str(d) for d in example_adapter_dirs()]
        # vlora-dev is left out: building its venv alone takes longer than this whole mode.
        suite = time.perf_counter()
        times = lanes([("fidelity", "--one-seed", *dirs, "--sizes", "4", "8", "--ratios", "5", "10",
                        "--limit", "50", "--no-vlora-dev", "--out", str(RESULTS / "fidelity_quick")),
                       ("scale", "--quick", "--no-vlora-dev")],
                      [("continual", "--quick")])
        times["serving"] = run("serving", "--quick", "--threads", "1")
    else:
        from benchmarks import testbed
        start = time.perf_counter()
        regimes = testbed.ensure(Path(args.testbed))
        testbed_s = time.perf_counter() - start  # training is outside the suite's time
        one, ind = ([str(d) for d in regimes[r]] for r in ("one-seed", "independent"))
        # Two cores: fidelity + scale beside continual; serving alone, timings need quiet.
        suite = time.perf_counter()
        times = lanes([("fidelity", "--one-seed", *one, "--independent", *ind, "--limit", "100"),
                       ("scale",)],
                      [("continual",)])
        times["serving"] = run("serving", "--threads", "1")
    wall = time.perf_counter() - suite
    suffix = "_quick" if quick else ""
    from benchmarks import plots
    figures = {png.stem.removesuffix(suffix): png.name for png in plots.main(["--quick"] if quick else [])}
    parts = [("Fidelity against bytes", "fidelity"), ("Scale", "scale"), ("Serving", "serving"),
             ("Continual learning (Share)", "continual")]
    out = ["# vlora benchmark results", "",
           f"Produced by `python -m benchmarks {args.mode}` on {time.strftime('%Y-%m-%d')}.", "",
           machine(), "", f"Suite wall time {wall:.0f} s; seconds per part: "
           + json.dumps({k: round(v) for k, v in times.items()})
           + (f" (test bed ready in {testbed_s:.0f} s, not counted)" if not quick else ""), ""]
    for title, part in parts:
        path = RESULTS / f"{part}{suffix}.md"
        body = path.read_text() if path.exists() else f"# {title}\n\n(not produced)\n"
        out += [f"<!-- {title}: from results/{path.name} -->", re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)]
        if part in figures:
            out += [f"![{title}](results/{figures[part]})"]
        out.append("")
    target = HERE / ("RESULTS_quick.md" if quick else "RESULTS.md")
    target.write_text("\n".join(out))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
