"""``python -m vlora.testbed``: train (or reuse) real LoRA adapters on MiniLM."""

from __future__ import annotations

import argparse
import json
import sys

from .data import TASKS, task_summary
from .train import DEFAULTS, build_testbed, default_cache_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vlora.testbed",
        description="Train PEFT LoRA adapters (r=8, query/value) of all-MiniLM-L6-v2 on real "
                    "offline text-classification tasks. Each (task, seed) goes to "
                    "OUT/<task>__s<seed>/ and is skipped when already trained with the same "
                    "recipe.")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="task names (default: all). See --list.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED")
    p.add_argument("--out", default=None,
                   help=f"cache folder (default: $VLORA_TESTBED_DIR or {default_cache_dir()})")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--r", type=int, default=DEFAULTS["r"])
    p.add_argument("--lora-alpha", type=int, default=DEFAULTS["lora_alpha"])
    p.add_argument("--max-eval", type=int, default=DEFAULTS["max_eval"])
    p.add_argument("--list", action="store_true", help="list tasks with their sizes and exit")
    p.add_argument("--quiet", action="store_true", help="no per-adapter progress lines")
    a = p.parse_args(argv)

    if a.list:
        for name, spec in TASKS.items():
            s = task_summary(name)
            print(f"{name:24s} {len(spec.labels)} classes  train {s['n_train']:5d}  "
                  f"eval {s['n_eval']:5d}  {spec.description}")
        return 0
    unknown = [t for t in a.tasks or [] if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(TASKS)}")
    dirs = build_testbed(a.tasks, a.seeds, a.out, progress=not a.quiet, steps=a.steps,
                         lr=a.lr, batch_size=a.batch_size, r=a.r, lora_alpha=a.lora_alpha,
                         max_eval=a.max_eval)
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        print(f"{d}\t{m['accuracy']:.3f}\t{m['majority_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
