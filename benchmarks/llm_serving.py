"""Serving the LLM test bed: one batch of rows from 1, 4, 16 or 32 distinct tasks.

The subspace is what ``compress`` keeps for the bed's 33 one-seed adapters at 10x,
6-bit (written by ``benchmarks.llm_fidelity`` under ``--subspace``; fitted here if
absent). Each of the ``--rows`` rows is a test-bed prompt of its task (round robin over
the tasks; left-padded), and every method generates ``--new-tokens`` greedy tokens:

* the bare base (transformers' ``generate``);
* PEFT's mixed batch: every task's vlora export loaded as a PEFT adapter,
  ``generate(adapter_names=...)``;
* vlora: :meth:`VLoRAModel.generate` with ``task_ids=`` (``bmm``): per-row cores on the
  shared bases, or per-row factors where the bases are wide (``--path``, default
  ``auto``); where ``auto`` factors any module the shared path alone is timed beside it.

Prefill tokens/s from one forward of the whole left-padded prompt batch (logits of the
last position, as ``generate`` computes them); decode tokens/s from one decode step
(every row's next greedy token) on a copy of that prompt's KV cache, rows over the
step's time. Each method runs inside its per-batch setup (vlora's route, PEFT's per-row
adapter hooks), which ``generate`` enters once. The methods take turns, ``--repeats``
rounds of one prefill and ``--steps`` decode steps each (after a warm-up round); medians
are reported. (Earlier versions took decode time as ``generate(1 + new) - generate(1)``:
two noisy totals of several seconds, whose difference swung by up to 40% between rounds
for the bare model alone on these shared cores.)
Every row's ``--new-tokens`` greedy tokens from vlora's ``generate`` are checked against
PEFT's with the same export.

    python -m benchmarks.llm_serving [--rows 32] [--new-tokens 16] [--repeats 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import commit
from benchmarks.llm_fidelity import SERVED
from vlora import SharedSubspace
from vlora.io import save_adapter
from vlora.model import VLoRAModel
from vlora.testbed import llm

RESULTS = Path(__file__).parent / "results"
TASK_COUNTS = (1, 4, 16, 32)
DEFAULT_SUBSPACE = SERVED


def subspace(folder: Path, root: Path, k: int | None) -> SharedSubspace:
    """The subspace at ``folder``; fitted there first if absent: with ``k``, a shared-only
    fit of k per side (one refinement round), else compress's 10x 6-bit choice."""
    if not (folder / "manifest.json").exists():
        from benchmarks.llm_fidelity import bed, save_fit
        from vlora.compress import compress
        from vlora.io import load_adapter
        dirs = bed(root)["one-seed"]
        adapters, ids = [load_adapter(d) for d in dirs], [d.name for d in dirs]
        save_fit(SharedSubspace.from_adapters(adapters, ids, num_components=k, refine_iters=1) if k
                 else compress(adapters, ids, ratio=10, bits=6), folder)
    return SharedSubspace.load(folder)


def peft_name(task: str) -> str:
    return task.replace(".", "_")  # PEFT's adapter names are module names: no dots


def batch(tasks: list[str], rows: int, root: Path, tokenizer) -> tuple[list[str], dict]:
    names, prompts = [], []
    for i in range(rows):
        t = tasks[i % len(tasks)]
        meta = llm.read_meta(root / "one-seed" / t)
        names.append(t)
        prompts.append(meta["prompt_ids"][(i // len(tasks)) % len(meta["prompt_ids"])])
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return names, {"input_ids": ids, "attention_mask": mask, "pad_token_id": pad}


def generate(model, inputs: dict, new: int, **kw) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    return time.perf_counter() - start, out[:, inputs["input_ids"].shape[1]:]


def timers(model, inputs: dict, **kw) -> tuple:
    """``(prefill, step)``: functions timing, in seconds, one forward of the prompt batch
    (logits of the last position only, as ``generate`` asks) and one decode step on a copy
    of its KV cache; ``kw`` are the method's forward arguments. Call them inside the
    method's per-call setup (:func:`setup`), which ``generate`` pays once, not per step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp_min(0)  # as generate() places left-padded rows
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **kw)
    cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    pos2 = mask2.sum(1, keepdim=True) - 1

    def timed(**call) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(**call, use_cache=True, **kw)
        return time.perf_counter() - start

    def step() -> float:
        return timed(input_ids=nxt, attention_mask=mask2, position_ids=pos2,
                     cache=copy.deepcopy(cache))
    return (lambda: timed(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)), step


def setup(model, method: str, names: list[str]):
    """The per-call setup ``generate`` enters once for a batch: vlora's route, PEFT's
    per-row adapter hooks (its private context, which its ``generate`` enters), none for
    the bare model."""
    if method.startswith("vlora"):
        return model.tasks(names)
    if method == "peft mixed":
        return model.base_model._enable_peft_forward_hooks(adapter_names=[peft_name(t) for t in names])
    return contextlib.nullcontext()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=llm.default_root())
    ap.add_argument("--subspace", type=Path, default=None,
                    help=f"default {DEFAULT_SUBSPACE} (10x 6-bit), or one-seed-k<K> beside it with --k")
    ap.add_argument("--k", type=int, default=None, help="serve a shared-only fit of k per side")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (one prefill each)")
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--path", choices=("auto", "shared", "factors"), default="auto",
                    help="VLoRAModel's path: per-row cores on the shared bases or per-row factors")
    ap.add_argument("--name", default="llm_serving")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.subspace is None:
        args.subspace = DEFAULT_SUBSPACE.parent / f"one-seed-k{args.k}" if args.k else DEFAULT_SUBSPACE
    sub = subspace(args.subspace, args.root, args.k)
    tasks = sub.tasks[:max(TASK_COUNTS)]
    base_dir = llm.ensure_base(args.root)
    tok = llm.load_tokenizer(base_dir)
    from peft import PeftModel
    with tempfile.TemporaryDirectory(prefix="vlora-llm-serve-") as tmp:
        for t in tasks:
            save_adapter(sub.reconstruct(t), Path(tmp) / t)
        pm = PeftModel.from_pretrained(llm.load_lm(None, base_dir), str(Path(tmp) / tasks[0]),
                                       adapter_name=peft_name(tasks[0])).eval()
        for t in tasks[1:]:
            pm.load_adapter(str(Path(tmp) / t), adapter_name=peft_name(t))
    bare = llm.load_lm(None, base_dir)
    vms = {"vlora mixed (bmm)": VLoRAModel(llm.load_lm(None, base_dir), sub, path=args.path)}
    factored = len(vms["vlora mixed (bmm)"].factored_modules)
    if factored and args.path == "auto":
        vms["vlora, shared path only"] = VLoRAModel(llm.load_lm(None, base_dir), sub, path="shared")
    results, equal = [], {}
    for count in TASK_COUNTS:
        names, inputs = batch(tasks[:count], args.rows, args.root, tok)
        models = {"base": bare, "peft mixed": pm, **vms}
        clocks = {}
        for m, model in models.items():
            with setup(model, m, names):
                clocks[m] = timers(model, inputs)
        times = {m: {"prefill": [], "step": []} for m in models}
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for m, (prefill, step) in clocks.items():
                with setup(models[m], m, names):
                    pre, steps = prefill(), [step() for _ in range(args.steps)]
                if rnd:
                    times[m]["prefill"].append(pre)
                    times[m]["step"].extend(steps)
        peft = generate(pm, inputs, args.new_tokens, adapter_names=[peft_name(t) for t in names])[1]
        for m, vm in vms.items():
            ours = generate(vm, inputs, args.new_tokens, task_ids=names)[1]
            equal.setdefault(m, {})[count] = [bool(torch.equal(a, b)) for a, b in zip(ours, peft)]
        prompt_tokens = int(inputs["input_ids"].numel())
        for m, x in times.items():
            pre, step = statistics.median(x["prefill"]), statistics.median(x["step"])
            results.append({"tasks": count, "method": m, "prefill_s": pre, "step_s": step,
                            "prefill_tok_s": prompt_tokens / pre, "decode_tok_s": args.rows / step,
                            "step_s_all": x["step"], "prefill_s_all": x["prefill"]})
        print(json.dumps([{k: v for k, v in r.items() if not k.endswith("_all")}
                          for r in results if r["tasks"] == count]), flush=True)
    ks = [(b.k_out, b.k_in) for b in sub.modules.values()]
    private = [sum(r for r in sub.get_task(t).private_ranks().values()) for t in tasks]
    out = {"config": {"rows": args.rows, "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "steps": args.steps,
                      "threads": args.threads, "prompt_width": int(inputs["input_ids"].shape[1]),
                      "subspace": str(args.subspace), "fit_report": sub.fit_report,
                      "path": args.path},
           "factored_modules": factored,
           "k_out_mean": statistics.mean(k[0] for k in ks),
           "k_in_mean": statistics.mean(k[1] for k in ks),
           "k_max": max(max(k) for k in ks), "modules": len(ks),
           "private_rank_sum_mean": statistics.mean(private), "results": results,
           "rows_equal_to_peft": {m: {str(c): sum(e) for c, e in by.items()} for m, by in equal.items()},
           "load_average": __import__("os").getloadavg()[0],
           "commit": commit()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    (RESULTS / f"{args.name}.md").write_text(report(out))
    print(report(out))
    return out


def report(out: dict) -> str:
    c = out["config"]
    base = {r["tasks"]: r for r in out["results"] if r["method"] == "base"}
    lines = ["# Serving the LLM test bed (SmolLM2-135M, 210 modules)", "",
             f"`python -m benchmarks.llm_serving` at {out['commit']}, {c['threads']} threads. "
             f"{c['rows']} rows of test-bed prompts (left-padded to {c['prompt_width']} tokens), "
             f"{c['new_tokens']} greedy new tokens compared with PEFT's; prefill: median of "
             f"{c['repeats']} forwards of the prompt batch, decode: median of "
             f"{c['repeats'] * c.get('steps', 1)} single decode steps on its KV cache, the methods "
             f"taking turns; load average "
             f"{out.get('load_average', 0):.1f} at the end. The subspace: {c['subspace'].rsplit('/', 1)[-1]} "
             f"of the one-seed bed ({out['modules']} modules, mean k "
             f"{out['k_out_mean']:.1f} out / {out['k_in_mean']:.1f} in, largest {out['k_max']}; "
             f"private ranks summed over modules, mean per task {out['private_rank_sum_mean']:.0f}; "
             f"VLoRAModel path {c.get('path', 'shared')!r}: {out.get('factored_modules', 0)} of "
             f"{out['modules']} modules served as per-row factors). "
             "Targets: vlora mixed >= 0.9x the bare model in prefill and >= 0.8x in decode at every "
             "task count; every row's tokens equal to PEFT's.", "",
             "| tasks | method | prefill tok/s | x base | decode tok/s | x base | rows = PEFT |",
             "|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        b = base[r["tasks"]]
        eq = ""
        if r["method"].startswith("vlora"):
            by = out["rows_equal_to_peft"]
            by = by.get(r["method"], by) if isinstance(next(iter(by.values())), dict) else by
            eq = f"{by[str(r['tasks'])]}/{c['rows']}"
        lines.append(f"| {r['tasks']} | {r['method']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / b['decode_tok_s']:.2f} | {eq} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
