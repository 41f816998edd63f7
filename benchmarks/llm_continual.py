"""Share on the LLM test bed: new tasks of a family learnt inside the subspace of the others.

A float32 subspace of ``k`` directions per side is fitted on some tasks of one family of
the LLM test bed (default: the chat-ai family's English, Italian, Spanish and Ukrainian
adapters); each new task of that family (default: Japanese, then Indonesian) is then
trained as coordinates inside it (:class:`vlora.training.SubspaceTrainer`, pseudo-rank
``p``) with the recipe of its LoRA in the bed (same training blocks, batch order, steps,
schedule; the LoRA's lr carried over by ``lora_equivalent_lr``), and written back.

Reported per new task: its eval-loss improvement over the base against its LoRA's
(base to LoRA), the trainable numbers against the LoRA's, and after each write-back the
forgetting of every earlier task: the rise of its eval loss, as a share of its
improvement. With ``phi = 0`` forgetting is zero by construction (the bases do not move);
with ``phi > 0`` the extra directions are folded into the bases.

    python -m benchmarks.llm_continual [--phi 0 2] [--k 48] [--p 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import commit
from vlora import SharedSubspace, load_adapter
from vlora.model import VLoRAModel
from vlora.testbed import llm
from vlora.testbed.llm_data import task_data
from vlora.testbed.train import run_steps
from vlora.training import SubspaceTrainer, lora_equivalent_lr

RESULTS = Path(__file__).parent / "results"
BASE_TASKS = ["chat_ai_en__s0", "chat_ai_it__s0", "chat_ai_es__s0", "chat_ai_uk__s0"]
NEW_TASKS = ["chat_ai_ja__s0", "chat_ai_id__s0"]


def eval_losses(sub: SharedSubspace, tasks: list[str], metas: dict[str, dict], base_dir) -> dict:
    """Each stored task's eval loss, served from ``sub`` (a fresh wrap: the bases may have moved)."""
    vm = VLoRAModel(llm.load_lm(None, base_dir), sub)
    out = {}
    with llm.torch_threads():
        for t in tasks:
            vm.set_task(t)
            out[t] = float(llm.block_stats(vm, metas[t]["eval_blocks"])[0].mean())
    vm.unwrap()
    return out


def train(sub: SharedSubspace, name: str, meta: dict, base_dir, phi: int, p: int
          ) -> tuple[SubspaceTrainer, dict]:
    hp = meta["hyperparameters"]
    data = task_data(meta["task"], llm.load_tokenizer(base_dir), hp["block_len"], hp["n_eval_blocks"],
                     hp["n_prompts"])
    assert data.eval_blocks == meta["eval_blocks"], "the task's data changed since its LoRA was trained"
    rates = lora_equivalent_lr(sub, hp["lr"], hp["lora_alpha"], hp["r"], p)
    with llm.torch_threads():
        model = llm.load_lm(None, base_dir)
        st = SubspaceTrainer(sub, name, model=model, **rates, num_expand=phi, pseudo_rank=p,
                             train_modules_to_save=False, seed=meta["seed"])
        steps, warmup = hp["steps"], max(1, hp["steps"] // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            st.optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
        blocks = torch.tensor(data.train_blocks)
        model.train()
        start = time.perf_counter()

        losses = run_steps(lambda idx: st.model(input_ids=blocks[idx], labels=blocks[idx]).loss,
                           st.optimizer, sched, len(blocks), hp["batch_size"], steps, meta["seed"])
        seconds = time.perf_counter() - start
        model.eval()
        loss = float(llm.block_stats(st.model, meta["eval_blocks"])[0].mean())
    return st, {"eval_loss": loss, "train_seconds": seconds, "final_train_loss": losses[-1],
                "trainable": st.num_trainable_params["adapter"], "rates": rates}


def run(phi: int, k: int, p: int, root: Path, base_tasks: list[str], new_tasks: list[str],
        refine_iters: int = 10) -> dict:
    base_dir = llm.ensure_base(root)
    dirs = {t: root / "one-seed" / t for t in base_tasks + new_tasks}
    metas = {t: llm.read_meta(d) for t, d in dirs.items()}
    sub = SharedSubspace.from_adapters([load_adapter(dirs[t]) for t in base_tasks], base_tasks,
                                       num_components=k, refine_iters=refine_iters)
    lora_numbers = load_adapter(dirs[new_tasks[0]]).num_lora_params()
    before = eval_losses(sub, base_tasks, metas, base_dir)
    rows = []
    for t in new_tasks:
        m = metas[t]
        st, out = train(sub, t, m, base_dir, phi, p)
        earlier = list(before)
        st.write_back()
        st.model.unwrap()
        after = eval_losses(sub, earlier + [t], metas, base_dir)
        lora_drop = m["base_eval_loss"] - m["eval_loss"]
        forgetting = {x: (after[x] - before[x]) / (metas[x]["base_eval_loss"] - before[x]) for x in earlier}
        trainable = out["trainable"]
        rows.append({"task": t, "phi": phi, "k": k, "p": p, "lora_drop": lora_drop,
                     "drop": m["base_eval_loss"] - out["eval_loss"],
                     "kept": (m["base_eval_loss"] - out["eval_loss"]) / lora_drop,
                     "kept_after_write_back": (m["base_eval_loss"] - after[t]) / lora_drop,
                     "trainable": trainable, "lora_trainable": lora_numbers,
                     "fewer": lora_numbers / trainable, "forgetting": forgetting,
                     "max_forgetting": max(forgetting.values()),
                     **{x: out[x] for x in ("train_seconds", "final_train_loss", "rates")}})
        before = after
        print(json.dumps({x: rows[-1][x] for x in ("task", "phi", "kept", "fewer", "max_forgetting")}),
              flush=True)
    return {"phi": phi, "k": k, "p": p, "base_tasks": base_tasks, "rows": rows}


def report(out: dict) -> str:
    lines = ["# Share on the LLM test bed (SmolLM2-135M, 210 modules)", "",
             f"`python -m benchmarks.llm_continual` at {out['commit']}. A float32 subspace of k = "
             f"{out['k']} per side fitted ({out.get('refine_iters', 10)} refinement rounds) on "
             f"{', '.join(out['base_tasks'])}; each new task trained "
             f"inside it at pseudo-rank p = {out['p']} with its LoRA's recipe (30 steps of 8 x 32 "
             "tokens, the LoRA's lr carried over by lora_equivalent_lr, no tuning), then written "
             "back. Kept: the task's eval-loss drop from the base as a share of its LoRA's. "
             "Forgetting: an earlier task's eval-loss rise after the write-back, as a share of "
             "its drop. Targets: kept >= 90% with >= 20x fewer trainable numbers at phi = 0; "
             "forgetting under 1% with phi > 0.", "",
             "| phi | new task | LoRA drop (nats) | kept | kept after write-back | trainable | "
             "fewer than LoRA | worst forgetting | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run_ in out["runs"]:
        for r in run_["rows"]:
            lines.append(f"| {r['phi']} | {r['task']} | {r['lora_drop']:.3f} | {r['kept']:.1%} | "
                         f"{r['kept_after_write_back']:.1%} | {r['trainable']:,} | {r['fewer']:.1f}x | "
                         f"{r['max_forgetting']:.2%} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=llm.default_root())
    ap.add_argument("--phi", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--base", nargs="+", default=BASE_TASKS)
    ap.add_argument("--new", nargs="+", default=NEW_TASKS)
    ap.add_argument("--refine-iters", type=int, default=10, help="of the subspace's fit")
    ap.add_argument("--name", default="llm_continual")
    args = ap.parse_args(argv)
    out = {"k": args.k, "p": args.p, "base_tasks": args.base,
           "commit": commit(),
           "refine_iters": args.refine_iters,
           "runs": [run(phi, args.k, args.p, args.root, args.base, args.new, args.refine_iters)
                    for phi in args.phi]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    (RESULTS / f"{args.name}.md").write_text(report(out))
    print(report(out))
    return out


if __name__ == "__main__":
    main()
