"""Choose the B-side learning-rate scale (and compare step counts) of the continual benchmark
on validation rows.

For each scale of :func:`vlora.training.lora_equivalent_lr`'s B-side lr (the A side keeps
the LoRA recipe's), every new task of the full continual setup is trained inside its
subspace (phi = 0, seeds 0-2) on the last 3/4 of its training rows and scored on the first
quarter: never on the eval split the benchmark reports. Not part of the suite (~5 min a
scale); its choice is written into ``continual.FULL["b_lr_scale"]`` by hand.

    python -m benchmarks.continual_tune --scales 0.5 1 2 4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.continual import FULL, coordinate_lr, train_in_subspace
from vlora import SharedSubspace, load_adapter
from vlora.testbed import build_testbed, default_cache_dir, load_task
from vlora.testbed.train import DEFAULTS, predict


def validation_accuracy(sub: SharedSubspace, task: str, setup: dict, seed: int, phi: int = 0) -> float:
    r = {**DEFAULTS, **setup["recipe"]}
    tr_x, tr_y, _, _, labels = load_task(task, r["max_train"], r["max_eval"], seed)
    n = len(tr_x) // 4
    st = train_in_subspace(sub, task, setup, phi, coordinate_lr(sub, setup), seed,
                           task_id=f"{task}__val", rows=(tr_x[n:], tr_y[n:], labels))
    pred = predict(st.model, tr_x[:n], max_length=r["max_length"])
    st.model.unwrap()
    sub.remove_task(f"{task}__val")
    return sum(int(p == g) for p, g in zip(pred, tr_y[:n])) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, help="subspace dimension (default: the full setup's)")
    p.add_argument("--p", type=int, help="pseudo-rank (default: the full setup's)")
    p.add_argument("--steps", type=int, nargs="+", default=[DEFAULTS["steps"]],
                   help="training steps in the subspace (each compared; the LoRAs' recipe has "
                        f"{DEFAULTS['steps']}: compare against LoRAs trained as long)")
    p.add_argument("--phi", type=int, default=0, help="extra directions per side")
    p.add_argument("--direction-lr", type=float, help="lr of the extra directions (default: A side's)")
    p.add_argument("--base", nargs="+", help="tasks of the subspace (default: the full setup's)")
    p.add_argument("--name", default="continual_tuning", help="results file name")
    p.add_argument("--cache-dir", default=None, help=f"test-bed cache (default {default_cache_dir()})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = dict(FULL)
    given = dict(k=a.k, p=a.p, base=a.base, direction_lr=a.direction_lr)
    setup.update({k: v for k, v in given.items() if v is not None})
    dirs = build_testbed(setup["base"], [0], a.cache_dir, threads=1)
    sub = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], task_ids=setup["base"],
                                       num_components=setup["k"])
    table = {}
    for scale in a.scales:
        for steps in a.steps:
            setup.update(b_lr_scale=scale, new_steps=steps)
            key = f"{scale}" if a.steps == [DEFAULTS["steps"]] else f"{scale}, {steps} steps"
            table[key] = {t: [validation_accuracy(sub, t, setup, s, a.phi) for s in a.seeds]
                          for t in setup["new"]}
            print(key, json.dumps(table[key]), flush=True)
    mean = {s: statistics.fmean(statistics.fmean(v) for v in row.values()) for s, row in table.items()}
    best = max(mean, key=mean.get)
    lines = ["# B-side learning-rate scale of the continual benchmark, on validation rows", "",
             f"Setup of `continual.FULL` (k = {setup['k']}, p = {setup['p']}, phi = {a.phi}; subspace of "
             f"{len(setup['base'])} tasks: {', '.join(setup['base'])}), seeds "
             f"{', '.join(map(str, a.seeds))}; trained on 3/4 of each task's training rows, "
             "scored on the other quarter. Accuracy per seed.", "",
             "| scale (, steps) | " + " | ".join(setup["new"]) + " | mean |",
             "|---|" + "---|" * (len(setup["new"]) + 1)]
    lines += [f"| {s} | " + " | ".join(", ".join(f"{x:.3f}" for x in row[t]) for t in setup["new"])
              + f" | {mean[s]:.4f} |" for s, row in table.items()]
    lines += ["", f"Best: {best} (mean {mean[best]:.4f}).", ""]
    out = Path(a.out)
    (out / f"{a.name}.json").write_text(json.dumps({"table": table, "mean": mean}, indent=1) + "\n")
    (out / f"{a.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
