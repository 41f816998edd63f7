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

    python -m benchmarks.continual            # 8 subspace tasks, 4 new ones (~15 min CPU)
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
from vlora.training import SubspaceTrainer

SEED = 0
FULL = dict(name="continual", k=32, p=4, phi=2,
            base=["rt_sentiment", "rt_subjectivity", "debate_trump_clinton", "convention_party",
                  "hamlet_speaker", "word_polarity", "chat_topic_en", "lang_id"],
            # The first four of debate_role, chat_topic_es, moral_foundation, roget_category,
            # chat_turn whose LoRA beats the majority class (debate_role's does not: 0.411 =
            # majority, so it could not tell training methods apart).
            new=["chat_topic_es", "moral_foundation", "roget_category", "chat_turn"], recipe={})
QUICK = dict(name="continual_quick", k=24, p=4, phi=2,
             base=["rt_sentiment", "chat_topic_en", "word_polarity"],
             new=["chat_topic_es", "rt_subjectivity"],
             recipe=dict(steps=16, max_train=256, max_eval=80))


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


def coordinate_lr(sub: SharedSubspace, setup: dict) -> float:
    """The LoRA recipe's lr, scaled so that one Adam step moves dW about as far.

    Adam moves every trainable number by about ``lr`` per step, so one step changes a
    LoRA's ``dW = s B A`` by about ``s lr sqrt(numbers)`` (in the B direction) and the
    coordinates' ``dW`` by ``lr' sqrt(numbers')``: ``lr' = s lr sqrt(n_LoRA / n_coords)``
    per module, averaged. Fixed before any run, from shapes alone (heads keep ``lr``).
    """
    r = {**DEFAULTS, **setup["recipe"]}
    ratios = [r["r"] * (b.d_out + b.d_in) / (setup["p"] * (b.k_out + b.k_in))
              for b in sub.modules.values()]
    return r["lr"] * r["lora_alpha"] / r["r"] * statistics.fmean(ratios) ** 0.5


def train_in_subspace(sub: SharedSubspace, task: str, setup: dict, phi: int,
                      lr: float) -> SubspaceTrainer:
    """Train ``task`` inside ``sub`` with the full LoRA's recipe (testbed.train_adapter)."""
    r = {**DEFAULTS, **setup["recipe"]}
    tr_x, tr_y, _, _, labels = load_task(task, r["max_train"], r["max_eval"], SEED)
    torch.manual_seed(SEED)
    model = load_minilm_classifier(len(labels), SEED)
    st = SubspaceTrainer(sub, task, model=model, lr=lr, head_lr=r["lr"], num_expand=phi,
                         pseudo_rank=setup["p"], seed=SEED)
    steps, warmup = r["steps"], max(1, r["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        st.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    labels_t, gen = torch.tensor(tr_y), torch.Generator().manual_seed(SEED)
    model.train()
    for idx in _batches(len(tr_x), min(r["batch_size"], len(tr_x)), steps, gen):
        logits = st.model(**tokenize([tr_x[i] for i in idx], r["max_length"])).logits
        st.step(torch.nn.functional.cross_entropy(logits, labels_t[idx]))
        sched.step()
    return st


def run_variant(setup: dict, dirs: dict[str, Path], phi: int) -> dict:
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
        stored = sub.get_task(task)
        metrics = json.loads((dirs[task] / "metrics.json").read_text())
        stored, drifts = sub.get_task(task), [r.drift for r in report.values()]
        rows.append(dict(
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
                basis_bytes=4 * sum(b.k_out * b.d_out + b.k_in * b.d_in for b in sub.modules.values()),
                summary=summarize(rows))


def summarize(rows: list[dict]) -> dict:
    mean = statistics.fmean
    return dict(
        mean_lora_acc=mean(r["lora_acc"] for r in rows),
        mean_trained_acc=mean(r["trained_acc"] for r in rows),
        mean_final_acc=mean(r["final_acc"] for r in rows),
        mean_gap_points=100 * mean(r["lora_acc"] - r["trained_acc"] for r in rows),
        mean_forgetting_points=100 * mean(r["forgetting"] for r in rows),
        max_forgetting_points=100 * max(r["forgetting"] for r in rows),
        param_ratio=mean(r["lora_trainable_adapter"] / r["trainable_adapter"] for r in rows))


def targets(m: dict) -> list[str]:
    """Each target of the issue, met or missed by how much (never adjusted to the data)."""
    checks = [("within 2 points of LoRA", m["mean_gap_points"] - 2.0, "points"),
              ("forgetting under 1 point", m["max_forgetting_points"] - 1.0, "points"),
              ("20x fewer trainable adapter parameters", 20.0 - m["param_ratio"], "x")]
    return [f"{name}: " + ("met" if over <= 0 else f"MISSED by {over:.1f} {unit}")
            for name, over, unit in checks]


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# Continual learning inside a shared subspace ({s['name']})", "",
             f"Subspace: {len(s['base'])} test-bed adapters ({', '.join(s['base'])}), k = {s['k']} "
             f"per side; new tasks in order: {', '.join(s['new'])}. Pseudo-rank p = {s['p']}. "
             f"Recipe of the full LoRAs and of training in the subspace: {result['recipe']} "
             f"(coordinates at the lr of `coordinate_lr`, heads at the recipe's). "
             f"Wall time {result['seconds']:.0f} s.", "",
             "Columns: the full LoRA's accuracy (majority class); the share of its energy inside "
             "the subspace when the task arrives; the accuracy of that LoRA projected (phi = 0); "
             "the task trained in the subspace; as stored after write-back (phi = 0: exact, not "
             "re-scored); after all later tasks; forgetting = stored - after.", ""]
    for v in result["variants"]:
        lines += [f"## phi = {v['phi']} (coordinate lr {v['coordinate_lr']:.3g})", "",
                  "| task | LoRA (majority) | LoRA energy in | LoRA projected | trained | stored "
                  "| after later | forgetting | trainable adapter / heads | vs LoRA | bytes/task (+heads) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
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
        lines += ["", f"Mean accuracy: LoRA {m['mean_lora_acc']:.3f}, trained in subspace "
                  f"{m['mean_trained_acc']:.3f} (LoRA minus subspace: {m['mean_gap_points']:+.1f} "
                  f"points), after all later tasks {m['mean_final_acc']:.3f}; forgetting mean "
                  f"{m['mean_forgetting_points']:+.1f}, max {m['max_forgetting_points']:+.1f} points; "
                  f"{m['param_ratio']:.1f}x fewer trainable adapter parameters than the LoRA "
                  f"({v['rows'][0]['lora_bytes']} bytes per LoRA). Bases: {v['basis_bytes']} bytes once.",
                  "", "Targets: " + "; ".join(targets(m))]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CI smoke run")
    p.add_argument("--cache-dir", default=None, help=f"test-bed cache (default {default_cache_dir()})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--k", type=int, help="subspace dimension per side (default: the setup's)")
    p.add_argument("--p", type=int, help="pseudo-rank of the trained coordinates")
    p.add_argument("--phi", type=int, nargs="+", help="variants to run (default: 0 and the setup's)")
    p.add_argument("--name", help="results file name (default: the setup's)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # reproducible decompositions; shared CPU machines
    setup = dict(QUICK if a.quick else FULL)
    setup.update({k: v for k, v in dict(k=a.k, p=a.p, name=a.name).items() if v is not None})
    # Quick adapters use another recipe: another folder, or they would replace the full ones.
    cache = Path(a.cache_dir or default_cache_dir()) / ("quick" if a.quick else "")
    t0 = time.perf_counter()
    tasks = setup["base"] + setup["new"]
    dirs = dict(zip(tasks, build_testbed(tasks, [SEED], cache, threads=1, **setup["recipe"])))
    variants = [run_variant(setup, dirs, phi) for phi in (a.phi or (0, setup["phi"]))]
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
