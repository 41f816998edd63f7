"""Run adapter folders through vLLM's offline engine, one engine start for all of them.

Run with the vLLM environment's python (``scripts/vllm_env.sh``)::

    python -m vlora.serving.vllm_driver JOB.json OUT.json

JOB.json: ``{"model": base folder, "max_lora_rank": int, "max_tokens": int,
"prompts": [[token ids], ...], "cases": [{"name": str, "path": folder}, ...]}``.
OUT.json: ``{"base": result, "cases": {name: result}, "engine_s": float}`` where a result
is ``{"tokens": [[id, ...] per prompt], "logprobs": [[float, ...] per prompt]}`` (the
greedy tokens and each one's log-probability) or ``{"error": vLLM's message}`` where vLLM
refused to load the adapter. Greedy decoding in float32, so tokens can be compared with
PEFT's. The engine is started under ``__main__`` (vLLM's engine core is a child process).

Optional: ``"max_loras"`` (default 1) and ``"batches": [[{"prompt": index into prompts,
"case": name or null for the base model}, ...], ...]``: each batch is one ``generate`` call
with a LoRA request per prompt (adapters mixed in one batch); OUT.json then has
``"batches": [result, ...]`` too, and ``"punica_wrapper"``, the wrapper vLLM's platform
names in this process (:mod:`vlora.serving.vllm_platform` changes it).
``"logprobs": n`` (default 1): with n > 1 a result also has ``"top"``, per prompt per
step the n most likely ``[token, logprob]`` pairs, best first (to tell near-ties).
``"generate_cases": false``: each case is only loaded (``{"loaded": true}`` or its
error), for jobs that generate in ``batches``; a batch entry whose case vLLM refused is
skipped (``null`` tokens and logprobs) rather than sent to the engine.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _result(outputs, top: int = 1) -> dict:
    tokens, logprobs, tops = [], [], []
    for out in outputs:
        c = out.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
        tops.append([sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])[:top]
                     for step in c.logprobs])
    return {"tokens": tokens, "logprobs": logprobs, **({"top": tops} if top > 1 else {})}


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    max_loras = job.get("max_loras", 1)
    llm = LLM(model=job["model"], dtype="float32", enable_lora=True,
              max_lora_rank=job.get("max_lora_rank", 16), max_loras=max_loras,
              max_cpu_loras=max(2, max_loras),
              max_model_len=job.get("max_model_len", 512), enforce_eager=True, seed=0)
    engine_s = time.perf_counter() - start
    top = job.get("logprobs", 1)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=top,
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    results = {"base": _result(llm.generate(prompts, params, use_tqdm=False), top), "cases": {}}
    for i, case in enumerate(job["cases"], 1):
        request = LoRARequest(case["name"], i, case["path"])
        try:
            # add_lora validates and loads the folder in the engine, raising vLLM's own
            # refusal here; a refused adapter in generate() could take the engine down
            llm.llm_engine.add_lora(request)
        except Exception as e:  # vLLM raises ValueError/RuntimeError wrapped by its IPC
            results["cases"][case["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        if job.get("generate_cases", True):
            outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
            results["cases"][case["name"]] = _result(outputs, top)
        else:
            results["cases"][case["name"]] = {"loaded": True}
        llm.llm_engine.remove_lora(i)
    if job.get("batches"):
        ids = {case["name"]: LoRARequest(case["name"], i, case["path"])
               for i, case in enumerate(job["cases"], 1)}
        results["batches"] = []
        for batch in job["batches"]:
            keep = [i for i, b in enumerate(batch)
                    if "error" not in results["cases"].get(b["case"], {})]
            got = _result(llm.generate(
                [prompts[batch[i]["prompt"]] for i in keep], params,
                lora_request=[batch[i]["case"] and ids[batch[i]["case"]] for i in keep],
                use_tqdm=False), top)
            row = {i: n for n, i in enumerate(keep)}
            results["batches"].append({k: [v[row[i]] if i in row else None
                                           for i in range(len(batch))] for k, v in got.items()})
    from vllm.platforms import current_platform

    results["punica_wrapper"] = current_platform.get_punica_wrapper()
    results["engine_s"] = engine_s
    return results


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes 4
    with open(sys.argv[1], encoding="utf-8") as f:
        out = run(json.load(f))
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)
