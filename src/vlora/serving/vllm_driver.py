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
"""

from __future__ import annotations

import json
import os
import sys
import time


def _result(outputs) -> dict:
    tokens, logprobs = [], []
    for out in outputs:
        c = out.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
    return {"tokens": tokens, "logprobs": logprobs}


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
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=1,
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    results = {"base": _result(llm.generate(prompts, params, use_tqdm=False)), "cases": {}}
    for i, case in enumerate(job["cases"], 1):
        request = LoRARequest(case["name"], i, case["path"])
        try:
            # add_lora validates and loads the folder in the engine, raising vLLM's own
            # refusal here; a refused adapter in generate() could take the engine down
            llm.llm_engine.add_lora(request)
        except Exception as e:  # vLLM raises ValueError/RuntimeError wrapped by its IPC
            results["cases"][case["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        results["cases"][case["name"]] = _result(outputs)
        llm.llm_engine.remove_lora(i)
    if job.get("batches"):
        ids = {case["name"]: LoRARequest(case["name"], i, case["path"])
               for i, case in enumerate(job["cases"], 1)}
        results["batches"] = []
        for batch in job["batches"]:
            outputs = llm.generate([prompts[b["prompt"]] for b in batch], params,
                                   lora_request=[b["case"] and ids[b["case"]] for b in batch],
                                   use_tqdm=False)
            results["batches"].append(_result(outputs))
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
