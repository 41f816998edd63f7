"""Continual learning inside a shared subspace (Share), on the real MiniLM test bed.

A subspace is fitted on LoRA adapters of some tasks; then NEW tasks (none of them in
the subspace) arrive one at a time. Each is trained inside the subspace with the
recipe of its full LoRA (same steps, batches, data order, learning rate and schedule,
head trained in full), written back, and every earlier task is scored again:

* ``phi = 0``: only the task's coordinates train (pseudo-rank ``p``); write-back is
  exact and moves no basis, so nothing can be forgotten (measured anyway at the end);
* ``phi > 0``: ``phi`` extra directions per side train too and are absorbed: the bases
  are refitted (same k) and every task is re-expressed, which can cost old tasks.

Per new task: accuracy of (a) its full LoRA, (b) the task trained in the subspace (and
as stored after write-back), (c) after all later absorbs; trainable parameters of the
adapter (heads counted apart) and bytes stored per task.

    python -m benchmarks.continual            # 16 subspace tasks, 4 new ones (~12 min, 1 core)
    python -m benchmarks.continual --quick    # CI smoke, a few minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlora import SharedSubspace, load_adapter
from vlora.model import VLoRAModel
from vlora.testbed import build_testbed, default_cache_dir, load_minilm_classifier, load_task, tokenize
from vlora.testbed.train import DEFAULTS, _batches, predict, read_eval_json
from vlora.training import SubspaceTrainer, lora_equivalent_lr

SEED = 0
# The subspace: 16 test-bed tasks, none of the 4 new ones, k = 76 per side (the most that
# keeps p = 2 at 20x fewer trainable numbers than the LoRA: 12 x 2 x 152 = 3,648). Chosen on
# validation rows carved from the training data (python -m benchmarks.continual_tune; the
# tables are in results/continual_tuning*.md): mean accuracy 0.680, against 0.665 with the
# first 8 tasks and k = 64, and 0.659 with those 8 at k = 48, p = 3. Those ran in the bases
# as refined, before fits turned them to their principal axes: the same subspace in other
# orthonormal frames scores 0.655 (principal axes), 0.642 and 0.659 (two random frames), as
# the random start and Adam's per-coordinate steps depend on the frame. Differences of under
# about 2 points between variants are within that spread.
# b_lr_scale: the B-side coordinate lr is this times lora_equivalent_lr's (0.5x, 1x, 2x and
# 4x compared the same way: 2x best).
FULL = dict(name="continual", k=76, p=2, phi=2, seeds=[0, 1, 2], b_lr_scale=2.0,
            base=["rt_sentiment", "rt_subjectivity", "debate_trump_clinton", "convention_party",
                  "gop_convention_year", "word_polarity", "chat_topic_en", "lang_id",
                  "chat_topic_it", "chat_topic_pt", "chat_topic_uk", "word_pleasantness",
                  "word_imagery", "debate_moderator", "guardian_pandemic", "debate_pence_kaine"],
            # The first four of debate_role, chat_topic_es, moral_foundation, roget_category,
            # chat_turn whose LoRA beats the majority class (debate_role's does not: 0.411 =
            # majority, so it could not tell training methods apart).
            new=["chat_topic_es", "moral_foundation", "roget_category", "chat_turn"], recipe={})
QUICK = dict(name="continual_quick", k=24, p=4, phi=2, seeds=[0], b_lr_scale=2.0,
             base=["rt_sentiment", "chat_topic_en", "word_polarity"],
             new=["chat_topic_es", "rt_subjectivity"],
             recipe=dict(steps=16, max_train=256, max_eval=80),
             folder="quick")  # another recipe: another folder, or they would replace the full ones


def accuracy(model, eval_dir: Path) -> float:
    ev = read_eval_json(eval_dir / "eval.json")
    pred = predict(model, ev["texts"], max_length=ev.get("max_length", 64))
    return sum(int(p == g) for p, g in zip(pred, ev["labels"])) / len(ev["labels"])


def score(sub: SharedSubspace, tasks: list[str], dirs: dict[str, Path]) -> dict[str, float]:
    """Accuracy of each stored task, served from the subspace (heads from the tasks)."""
    vm = VLoRAModel(load_minilm_classifier(2, SEED), sub)
    out = {}
    for t in tasks:
        vm.set_task(t)
        out[t] = accuracy(vm, dirs[t])
    vm.unwrap()
    return out


def coordinate_lr(sub: SharedSubspace, setup: dict) -> dict[str, float]:
    """The LoRA recipe's learning rates carried over by :func:`lora_equivalent_lr`, the B
    side scaled by ``setup["b_lr_scale"]`` (heads keep the recipe's lr)."""
    r = {**DEFAULTS, **setup["recipe"]}
    rates = lora_equivalent_lr(sub, r["lr"], r["lora_alpha"], r["r"], setup["p"])
    return {**rates, "lr": rates["lr"] * setup["b_lr_scale"]}


def train_in_subspace(sub: SharedSubspace, task: str, setup: dict, phi: int,
                      lr: dict[str, float], seed: int = SEED, task_id: str | None = None,
                      rows: tuple[list, list, list] | None = None) -> SubspaceTrainer:
    """Train ``task`` inside ``sub`` (as ``task_id``) with the recipe of its full LoRA of
    the same ``seed`` (testbed.train_adapter: head init, training subset, batch order), on
    its training rows or on ``rows`` = (texts, labels, label names)."""
    r = {**DEFAULTS, **setup["recipe"]}
    tr_x, tr_y, labels = rows or [load_task(task, r["max_train"], r["max_eval"], seed)[i] for i in (0, 1, 4)]
    torch.manual_seed(seed)
    model = load_minilm_classifier(len(labels), seed)
    st = SubspaceTrainer(sub, task_id or task, model=model, **lr, head_lr=r["lr"], num_expand=phi,
                         direction_lr=setup.get("direction_lr"), pseudo_rank=setup["p"], seed=seed)
    steps = setup.get("new_steps") or r["steps"]
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        st.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    labels_t, gen = torch.tensor(tr_y), torch.Generator().manual_seed(seed)
    model.train()
    for idx in _batches(len(tr_x), min(r["batch_size"], len(tr_x)), steps, gen):
        logits = st.model(**tokenize([tr_x[i] for i in idx], r["max_length"])).logits
        st.step(torch.nn.functional.cross_entropy(logits, labels_t[idx]))
        sched.step()
    return st


def other_seeds(sub: SharedSubspace, task: str, setup: dict, phi: int, lr: dict[str, float],
                lora_dirs: dict[int, Path]) -> tuple[list[float], list[float]]:
    """(LoRA, trained in the subspace) accuracy of ``task`` for every seed but the first:
    one run is too noisy to tell a 2-point gap (eval splits of 100-400 rows). These runs
    are scored as trained and dropped: nothing is written back (or absorbed)."""
    loras, trained = [], []
    for seed, d in lora_dirs.items():
        loras.append(json.loads((d / "metrics.json").read_text())["accuracy"])
        st = train_in_subspace(sub, task, setup, phi, lr, seed, task_id=f"{task}__seed{seed}")
        trained.append(accuracy(st.model, d))
        st.model.unwrap()
        sub.remove_task(f"{task}__seed{seed}")
    return loras, trained


def run_variant(setup: dict, dirs: dict[str, Path], phi: int,
                seed_dirs: dict[str, dict[int, Path]]) -> dict:
    base, new = setup["base"], setup["new"]
    sub = SharedSubspace.from_adapters([load_adapter(dirs[t]) for t in base], task_ids=base,
                                       num_components=setup["k"])
    # With phi = 0 no basis ever moves, so the subspace tasks cannot change: scored once.
    base_start = score(sub, base, dirs) if phi else {}
    lr = coordinate_lr(sub, setup)
    rows, history = [], {}
    for i, task in enumerate(new):
        lora = load_adapter(dirs[task])
        # Can the subspace hold this task at all? Its full LoRA's energy inside it, and
        # (phi = 0, where the bases never move) the accuracy of that LoRA projected.
        probe = sub.project(lora, "probe")
        coverage, projected = probe.coverage, None
        if not phi:
            sub.add_task(probe)
            projected = score(sub, ["probe"], {"probe": dirs[task]})["probe"]
            sub.remove_task("probe")
        t0 = time.perf_counter()
        st = train_in_subspace(sub, task, setup, phi, lr)
        train_s = time.perf_counter() - t0
        trained = accuracy(st.model, dirs[task])
        counts = st.num_trainable_params
        report = st.write_back()
        st.model.unwrap()
        now = score(sub, new[:i + 1], dirs) if phi else {task: trained}
        for t, acc in now.items():
            history.setdefault(t, []).append(acc)
        metrics = json.loads((dirs[task] / "metrics.json").read_text())
        stored, drifts = sub.get_task(task), [r.drift for r in report.values()]
        loras, trains = [metrics["accuracy"]], [trained]
        if seed_dirs.get(task):
            more = other_seeds(sub, task, setup, phi, lr, seed_dirs[task])
            loras, trains = loras + more[0], trains + more[1]
        rows.append(dict(lora_acc_seeds=loras, trained_acc_seeds=trains,
            task=task, lora_acc=metrics["accuracy"], majority_acc=metrics["majority_accuracy"],
            lora_coverage=coverage, lora_projected_acc=projected, trained_acc=trained,
            stored_acc=now[task], train_seconds=round(train_s, 1),
            trainable_adapter=counts["adapter"], trainable_heads=counts["heads"],
            lora_trainable_adapter=lora.num_lora_params(), bytes_per_task=4 * stored.num_params(),
            head_bytes=4 * sum(v.numel() for v in stored.extra.values()),
            lora_bytes=4 * lora.num_lora_params(), error_after_write_back=stored.error,
            absorb_mean_drift=statistics.fmean(drifts) if drifts else 0.0,
            absorb_max_drift=max(drifts, default=0.0)))
        print(f"  phi={phi} {task:18s} lora {metrics['accuracy']:.3f} trained {trained:.3f} "
              f"stored {now[task]:.3f} coverage {coverage:.2f} ({train_s:.0f}s)", flush=True)
    final = score(sub, new, dirs)
    for row in rows:
        row["final_acc"] = final[row["task"]]
        row["history"] = history[row["task"]]
        row["forgetting"] = row["stored_acc"] - row["final_acc"]
    base_end = score(sub, base, dirs) if phi else {}
    return dict(phi=phi, coordinate_lr=lr, rows=rows, base_start=base_start, base_end=base_end,
                basis_bytes=sub.compression_stats()["basis_bytes"],  # Grams included
                summary=summarize(rows))


def summarize(rows: list[dict]) -> dict:
    """Means over tasks; the gap to the LoRAs over every seed run."""
    mean = statistics.fmean
    return dict(
        mean_lora_acc=mean(r["lora_acc"] for r in rows),
        mean_trained_acc=mean(r["trained_acc"] for r in rows),
        mean_final_acc=mean(r["final_acc"] for r in rows),
        seeds=min(len(r["trained_acc_seeds"]) for r in rows),
        mean_gap_points=100 * mean(mean(r["lora_acc_seeds"]) - mean(r["trained_acc_seeds"])
                                   for r in rows),
        gap_points_per_seed=[100 * mean(r["lora_acc_seeds"][i] - r["trained_acc_seeds"][i] for r in rows)
                             for i in range(min(len(r["trained_acc_seeds"]) for r in rows))],
        mean_forgetting_points=100 * mean(r["forgetting"] for r in rows),
        max_forgetting_points=100 * max(r["forgetting"] for r in rows),
        param_ratio=mean(r["lora_trainable_adapter"] / r["trainable_adapter"] for r in rows))


def targets(m: dict, phi: int) -> list[str]:
    """Each target of the issue, met or missed by how much (never adjusted to the data).
    The issue counts the 20x at phi = 0; with phi > 0 the ratio is reported only."""
    checks = [("within 2 points of LoRA", m["mean_gap_points"] - 2.0, "points"),
              ("forgetting under 1 point", m["max_forgetting_points"] - 1.0, "points")]
    if not phi:
        checks.append(("20x fewer trainable adapter parameters", 20.0 - m["param_ratio"], "x"))
    return [f"{name}: " + ("met" if over <= 0 else f"MISSED by {over:.2f} {unit}")
            for name, over, unit in checks]


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# Continual learning inside a shared subspace ({s['name']})", "",
             f"Subspace: {len(s['base'])} test-bed adapters ({', '.join(s['base'])}), k = {s['k']} "
             f"per side; new tasks in order: {', '.join(s['new'])}. Pseudo-rank p = {s['p']}. "
             f"Recipe of the full LoRAs and of training in the subspace: {result['recipe']} "
             "(coordinates at the learning rates of `vlora.training.lora_equivalent_lr`, "
             "heads at the recipe's). "
             + (f"The new tasks' LoRAs and their training in the subspace take {s['new_steps']} steps. "
                if s.get("new_steps") else "")
             + f"Wall time {result['seconds']:.0f} s.", "",
             "Columns: the full LoRA's accuracy (majority class); the share of its energy inside "
             "the subspace when the task arrives; the accuracy of that LoRA projected (phi = 0); "
             "the task trained in the subspace; as stored after write-back (phi = 0: exact, not "
             "re-scored); after all later tasks; forgetting = stored - after.", ""]
    for v in result["variants"]:
        lr = v["coordinate_lr"]
        lines += [f"## phi = {v['phi']} (coordinate lr: B side {lr['lr']:.3g}, A side {lr['a_lr']:.3g})", "",
                  "| task | LoRA (majority) | LoRA energy in | LoRA projected | trained | stored "
                  "| after later | forgetting | trainable adapter / heads | vs LoRA | bytes/task (+heads) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        if v["phi"]:
            rate = s.get("direction_lr") or "of the A side"
            lines[-2:-2] = [f"The {v['phi']} extra directions per side and module train with their "
                            f"coordinates (d_out + d_in numbers each, at lr {rate}): they are most "
                            "of the trainable count. Write-back absorbs them at the same k.", ""]
        for r in v["rows"]:
            proj = "" if r["lora_projected_acc"] is None else f"{r['lora_projected_acc']:.3f}"
            lines.append(
                f"| {r['task']} | {r['lora_acc']:.3f} ({r['majority_acc']:.3f}) "
                f"| {r['lora_coverage']:.2f} | {proj} | {r['trained_acc']:.3f} | {r['stored_acc']:.3f} "
                f"| {r['final_acc']:.3f} | {100 * r['forgetting']:+.1f} pt "
                f"| {r['trainable_adapter']} / {r['trainable_heads']} "
                f"| {r['lora_trainable_adapter'] / r['trainable_adapter']:.1f}x fewer "
                f"| {r['bytes_per_task']} (+{r['head_bytes']}) |")
        m = v["summary"]
        if m["seeds"] > 1:
            lines += ["", f"Seeds {', '.join(map(str, s['seeds']))} (LoRA and training in the "
                      "subspace alike; seed 0 is the one stored, the others are scored as trained and "
                      "dropped), accuracy per seed, LoRA / subspace: "
                      + "; ".join(f"{r['task']} " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in
                                                            zip(r["lora_acc_seeds"], r["trained_acc_seeds"]))
                                  for r in v["rows"])
                      + ". Mean gap per seed: " + ", ".join(f"{g:+.1f}" for g in m["gap_points_per_seed"])
                      + " points."]
        lines += ["", f"Mean accuracy (seed 0): LoRA {m['mean_lora_acc']:.3f}, trained in subspace "
                  f"{m['mean_trained_acc']:.3f}; LoRA minus subspace over {m['seeds']} seed(s): "
                  f"{m['mean_gap_points']:+.2f} points; after all later tasks {m['mean_final_acc']:.3f}; "
                  f"forgetting mean "
                  f"{m['mean_forgetting_points']:+.1f}, max {m['max_forgetting_points']:+.1f} points; "
                  f"{m['param_ratio']:.1f}x fewer trainable adapter parameters than the LoRA "
                  f"({v['rows'][0]['lora_bytes']} bytes per LoRA). "
                  f"Bases (with their Grams): {v['basis_bytes']} bytes once.",
                  "", "Targets: " + "; ".join(targets(m, v["phi"]))]
        if v["base_start"]:
            drop = 100 * statistics.fmean(v["base_start"][t] - v["base_end"][t] for t in v["base_start"])
            lines += ["", "Subspace tasks (projected LoRAs), accuracy before -> after all absorbs: "
                      + ", ".join(f"{t} {v['base_start'][t]:.3f} -> {v['base_end'][t]:.3f}"
                                  for t in v["base_start"]) + f" (mean drop {drop:+.1f} points).",
                      "", "Each new task's accuracy after its own and every later absorb: "
                      + "; ".join(f"{r['task']} " + " -> ".join(f"{a:.3f}" for a in r["history"])
                                  for r in v["rows"]) + "."]
        lines.append("")
    return "\n".join(lines)


def adapters(setup: dict, cache_dir: str | None = None
             ) -> tuple[dict[str, Path], dict[str, dict[int, Path]]]:
    """The LoRAs of ``setup``, trained where missing (``python -m benchmarks all`` calls this
    before its clock starts): ``({task: seed-0 folder}, {new task: {other seed: folder}})``."""
    cache = Path(cache_dir or default_cache_dir()) / setup.get("folder", "")
    new_recipe, new_cache = setup["recipe"], cache
    if setup.get("new_steps"):
        new_recipe = {**new_recipe, "steps": setup["new_steps"]}
        new_cache = cache / f"steps{setup['new_steps']}"
    dirs = dict(zip(setup["base"], build_testbed(setup["base"], [SEED], cache, threads=1, **setup["recipe"])))
    dirs.update(zip(setup["new"], build_testbed(setup["new"], [SEED], new_cache, threads=1, **new_recipe)))
    more = [s for s in setup["seeds"] if s != SEED]
    return dirs, {t: dict(zip(more, build_testbed([t], more, new_cache, threads=1, **new_recipe)))
                  for t in setup["new"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CI smoke run")
    p.add_argument("--cache-dir", default=None, help=f"test-bed cache (default {default_cache_dir()})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--k", type=int, help="subspace dimension per side (default: the setup's)")
    p.add_argument("--p", type=int, help="pseudo-rank of the trained coordinates")
    p.add_argument("--phi", type=int, nargs="+", help="variants to run (default: 0 and the setup's)")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="seeds of every variant (seed 0, always run, is the one stored)")
    p.add_argument("--new-steps", type=int,
                   help="steps of the new tasks' LoRAs and of their training in the subspace "
                        "(default: the recipe's); those LoRAs are cached in <cache>/steps<N>")
    p.add_argument("--name", help="results file name (default: the setup's)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # reproducible decompositions; shared CPU machines
    setup = dict(QUICK if a.quick else FULL)
    setup.update({k: v for k, v in dict(k=a.k, p=a.p, name=a.name, seeds=a.seeds,
                                        new_steps=a.new_steps).items() if v is not None})
    t0 = time.perf_counter()
    dirs, seed_dirs = adapters(setup, a.cache_dir)
    variants = [run_variant(setup, dirs, phi, seed_dirs) for phi in (a.phi or (0, setup["phi"]))]
    result = dict(setup=setup, recipe={**DEFAULTS, **setup["recipe"], "target_modules": ["query", "value"]},
                  variants=variants, seconds=time.perf_counter() - t0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{setup['name']}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{setup['name']}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
