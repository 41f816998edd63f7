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
import itertools
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

    def label(part):  # "scale 7b-qv" for a part run for some of its families
        if "--families" not in part:
            return part[0]
        rest = part[part.index("--families") + 1:]
        return " ".join([part[0], *itertools.takewhile(lambda a: not a.startswith("-"), rest)])

    def lane(parts):
        return {label(part): run(*part) for part in parts}
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


PARTS = [("Fidelity against bytes", "fidelity"), ("Scale", "scale"), ("Serving", "serving"),
         ("Continual learning (Share)", "continual")]
# Runs outside the suite's clock that qualify a part's figures, quoted after them when present.
CONTROLS = [("Control: serving with a private part of rank 4 for every task",
             "python -m benchmarks.serving --private-rank 4", "serving_private4"),
            ("Control: shared and private parts against per-adapter SVD (the byte-target grid)",
             "python -m benchmarks.sharing_grid --sets shipped,one-seed,independent --name sharing_grid",
             "sharing_grid"),
            ("Control: continual learning with LoRAs trained twice as long",
             "python -m benchmarks.continual --new-steps 120 --phi 0 --name continual_steps120",
             "continual_steps120"),
            ("Control: continual learning over 6 seeds (phi = 0)",
             "python -m benchmarks.continual --phi 0 --seeds 0 1 2 3 4 5 --name continual_seeds6",
             "continual_seeds6"),
            ("Scale beyond one machine: the fit on a local Ray cluster (Llama-7B-shaped layers)",
             "python -m benchmarks.distributed --n 1000 --layers 1 --repeats 3 --name distributed",
             "distributed"),
            ("Ray fit memory, N = 250 (2 workers; beside the next, for flat per-worker memory)",
             "python -m benchmarks.distributed --n 250 --workers 2 --name distributed_mem_n250",
             "distributed_mem_n250"),
            ("Ray fit memory and speed, N = 1000 (streaming and 2 workers)",
             "python -m benchmarks.distributed --n 1000 --workers 0,2 --name distributed_mem_n1000",
             "distributed_mem_n1000"),
            ("Control: continual learning over 6 seeds, the extra directions trained (phi = 2)",
             "python -m benchmarks.continual --phi 2 --seeds 0 1 2 3 4 5 --name continual_phi2_seeds6",
             "continual_phi2_seeds6")]


# The LLM test bed's parts (python -m benchmarks.testbed --llm builds it: about 41 x 50-70 s):
# run alone, outside the suite's clock, quoted in their own section.
LLM_PARTS = [("Fidelity, one-seed set, float32",
              "python -m benchmarks.llm_fidelity --regimes one-seed --ratios 10 --refine-iters 3 "
              "--name llm_fidelity_one_seed", "llm_fidelity_one_seed"),
             ("Inside each family of the one-seed set, float32",
              "python -m benchmarks.llm_fidelity --regimes one-seed --ratios --no-scores --refine-iters 3 "
              "--name llm_fidelity_families", "llm_fidelity_families"),
             ("Fidelity, loss kept and held-out tasks, one-seed set, 10x 6-bit",
              "python -m benchmarks.llm_fidelity --regimes one-seed --ratios 10 --bits 6 --no-families "
              "--no-vlora-dev --name llm_fidelity_one_seed_10x6", "llm_fidelity_one_seed_10x6"),
             ("Fidelity, one-seed set, 20x (6-bit and float32)",
              "python -m benchmarks.llm_fidelity --regimes one-seed --ratios 20 --bits 6 32 --no-families "
              "--no-scores --name llm_fidelity_one_seed_grid", "llm_fidelity_one_seed_grid"),
             ("Fidelity, one-seed set, 4x (6-bit and float32)",
              "python -m benchmarks.llm_fidelity --regimes one-seed --ratios 4 --bits 6 32 --no-families "
              "--no-scores --name llm_fidelity_one_seed_4x", "llm_fidelity_one_seed_4x"),
             ("Fidelity, loss kept and agreement, independent set",
              "python -m benchmarks.llm_fidelity --regimes independent --no-families "
              "--name llm_fidelity_independent",
              "llm_fidelity_independent"),
             ("Loss kept and agreement of a shared-only fit (k = 32, float32)",
              "python -m benchmarks.llm_fidelity --regimes one-seed --scores-of <llm_serving's one-seed-k32 "
              "fit> --name llm_scores_k32", "llm_scores_k32"),
             ("Build time and memory", "python -m benchmarks.llm_build", "llm_build"),
             ("Serving (the 10x 6-bit fit: per-row factors where the bases are wide)",
              "python -m benchmarks.llm_serving", "llm_serving"),
             ("Serving a shared-only fit (k = 32 per side)",
              "python -m benchmarks.llm_serving --k 32 --name llm_serving_k32",
              "llm_serving_k32"),
             ("Control: the k = 32 fit served as per-row factors (what path='auto' declines there)",
              "python -m benchmarks.llm_serving --k 32 --path factors --name llm_serving_k32_factors",
              "llm_serving_k32_factors"),
             ("Share inside a family", "python -m benchmarks.llm_continual", "llm_continual"),
             ("Share inside the chat tasks (16 adapters as the subspace)",
              "python -m benchmarks.llm_continual --phi 0 --k 64 --p 8 --refine-iters 3 --base <the 16 "
              "other chat adapters> --name llm_continual_chat16", "llm_continual_chat16"),
             ("Every test-bed task's export in vLLM against PEFT",
              "python -m benchmarks.vllm_bed_check", "vllm_bed_check"),
             ("vLLM serving a subspace by name against PEFT folders",
              "python -m benchmarks.vllm_serving", "vllm_serving"),
             ("vLLM with vlora's grouped LoRA wrapper (VLORA_VLLM_PLATFORM=1) against its own",
              "python -m benchmarks.vllm_platform --pairs 2", "vllm_platform")]


def write_results(quick: bool) -> Path:
    """RESULTS(_quick).md from the parts' results and the last suite run's ``suite*.json``;
    a part re-run alone after that suite is named as such."""
    suffix = "_quick" if quick else ""
    from benchmarks import plots
    figures = {png.stem.removesuffix(suffix): png.name for png in plots.main(["--quick"] if quick else [])}
    suite_file = RESULTS / f"suite{suffix}.json"
    suite = json.loads(suite_file.read_text())
    out = ["# vlora benchmark results", "",
           f"Produced by `python -m benchmarks {'quick' if quick else 'all'}` on {suite['date']}.", "",
           machine(), "", f"Suite wall time {suite['wall']:.0f} s; seconds per part: "
           + json.dumps({k: round(v) for k, v in suite["times"].items()})
           + (f" (test bed ready in {suite['testbed_s']:.0f} s, not counted)" if not quick else "")]
    rerun = [part for _, part in PARTS if (RESULTS / f"{part}{suffix}.json").exists()
             and (RESULTS / f"{part}{suffix}.json").stat().st_mtime > suite_file.stat().st_mtime]
    if rerun:
        out.append(f"Re-run alone after the suite (`python -m benchmarks.<part>`, then "
                   f"`python -m benchmarks report`): {', '.join(rerun)}.")
    out.append("")
    for title, part in PARTS:
        path = RESULTS / f"{part}{suffix}.md"
        body = path.read_text() if path.exists() else f"# {title}\n\n(not produced)\n"
        out += [f"<!-- {title}: from results/{path.name} -->", re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)]
        if part in figures:
            out += [f"![{title}](results/{figures[part]})"]
        out.append("")
    for title, command, name in [] if quick else CONTROLS:
        path = RESULTS / f"{name}.md"
        if path.exists():
            body = re.sub(r"^(#+) ", r"##\1 ", path.read_text(), flags=re.M)
            out += [f"## {title}", "", f"Run alone, not part of the suite: `{command}`.", "", body, ""]
    llm = [(t, c, n) for t, c, n in ([] if quick else LLM_PARTS) if (RESULTS / f"{n}.md").exists()]
    if llm:
        out += ["# The LLM test bed (SmolLM2-135M-Instruct, LoRA r=16 on all seven linear module types)",
                "", "41 PEFT adapters (33 from one init seed, 8 from seeds of their own) trained on real "
                "text by `python -m benchmarks.testbed --llm` (vlora.testbed.llm; metrics defined "
                "there and in docs/DESIGN.md). Each part is run alone, not in the suite.", ""]
    for title, command, name in llm:
        body = re.sub(r"^(#+) ", r"##\1 ", (RESULTS / f"{name}.md").read_text(), flags=re.M)
        out += [f"## {title}", "", f"`{command}`", "", body, ""]
    target = HERE / f"RESULTS{suffix}.md"
    target.write_text("\n".join(out))
    print(f"wrote {target}")
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["all", "quick", "report"],
                    help="report: rebuild RESULTS.md from the results there are (after re-running one part)")
    ap.add_argument("--quick", action="store_true", help="with report: RESULTS_quick.md")
    ap.add_argument("--testbed", default=str(Path.home() / ".cache" / "vlora" / "bench-testbed"),
                    help="test-bed cache (``all`` trains what is missing; see benchmarks/testbed.py)")
    args = ap.parse_args(argv)
    if args.mode == "report":
        write_results(args.quick)
        return
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
        # a smoke run: 3 rounds (the full run's 7 are for tight timings)
        times["serving"] = run("serving", "--quick", "--threads", "1", "--repeats", "3", "1")
    else:
        from benchmarks import continual, testbed
        start = time.perf_counter()
        regimes = testbed.ensure(Path(args.testbed))
        continual.adapters(continual.FULL)
        testbed_s = time.perf_counter() - start  # training is outside the suite's time
        one, ind = ([str(d) for d in regimes[r]] for r in ("one-seed", "independent"))
        # Two cores, one thread per part: fidelity (about 900 s) then the 7B scale family beside
        # continual (about 820 s) then the square one; serving last and alone (its timings
        # need a quiet machine), on both.
        suite = time.perf_counter()
        times = lanes([("fidelity", "--one-seed", *one, "--independent", *ind,
                        "--ratios", "10", "20", "--sizes", "4", "8", "16", "32"),
                       ("scale", "--families", "7b-qv", "--no-merge")],
                      [("continual",), ("scale", "--families", "square", "--no-merge")])
        times["serving"] = run("serving", "--threads", "2")
    from benchmarks import scale
    scale.merge(quick)  # here, once both lanes are done (the lanes' runs do not merge)
    wall = time.perf_counter() - suite
    (RESULTS / f"suite{'_quick' if quick else ''}.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "wall": wall, "times": times, "testbed_s": testbed_s}))
    write_results(quick)


if __name__ == "__main__":
    main()
