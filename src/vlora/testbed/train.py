"""Train, cache and evaluate real PEFT LoRA adapters on MiniLM.

One adapter = one (task, seed): LoRA r=8 on the attention ``query`` and
``value`` projections of all-MiniLM-L6-v2, with the classification head
trained in full (PEFT ``SEQ_CLS`` puts it in ``modules_to_save``). A plain
torch loop keeps the run small and reproducible on two CPU cores.

An adapter folder holds what PEFT writes (``adapter_model.safetensors``,
``adapter_config.json``) plus ``eval.json`` (the held-out texts, labels and
label names) and ``metrics.json`` (accuracy, majority-class rate, timing and
the full recipe), so any later transform of the adapter can be scored on the
same examples with :func:`evaluate_adapter`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .data import TASKS, load_task
from .models import load_minilm_classifier, tokenize

RECIPE_VERSION = "minilm-lora-qv-v1"
BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

DEFAULTS = dict(steps=60, r=8, lora_alpha=16, target_modules=("query", "value"),
                batch_size=16, lr=5e-3, max_length=64, max_train=2000, max_eval=400)


def recipe_key(**overrides) -> str:
    """Version plus a digest of the hyper-parameters: the cache key of an adapter."""
    recipe = {**DEFAULTS, **overrides}
    recipe["target_modules"] = list(recipe["target_modules"])
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"{RECIPE_VERSION}-{digest}"


def _batches(n: int, batch_size: int, steps: int, generator):
    """``steps`` index batches, walking fresh permutations epoch after epoch."""
    import torch

    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch_size].tolist()
        pos += batch_size


def run_steps(loss_of, opt, sched, n: int, batch_size: int, steps: int, seed: int) -> list[float]:
    """``steps`` optimiser steps on index batches of ``n`` rows (seeded order); ``loss_of``
    maps a list of row indices to the batch's loss. Returns every step's loss."""
    import torch

    losses = []
    for idx in _batches(n, min(batch_size, n), steps, torch.Generator().manual_seed(seed)):
        loss = loss_of(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def predict(model, texts, batch_size: int = 64, max_length: int = 64) -> list[int]:
    """Argmax label ids of a (PEFT or plain) classifier on ``texts``, in their order."""
    import torch

    model.eval()
    # Batches of similar length pad little: 1.5-2.7x faster on the test bed's eval
    # splits, and the attention mask makes each row's logits independent of its batch.
    lengths = tokenize(texts, max_length)["attention_mask"].sum(1).tolist() if texts else []
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out: list[int] = [0] * len(texts)
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            enc = tokenize([texts[j] for j in rows], max_length)
            for j, label in zip(rows, model(**enc).logits.argmax(-1).tolist()):
                out[j] = label
    return out


def _accuracy(pred, gold) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(1, len(gold))


def majority_accuracy(labels) -> float:
    return max(labels.count(k) for k in set(labels)) / len(labels) if labels else 0.0


def train_adapter(task: str, seed: int, out_dir, steps: int = DEFAULTS["steps"], r: int = 8,
                  lora_alpha: int = 16, target_modules=("query", "value"),
                  batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                  max_length: int = DEFAULTS["max_length"],
                  max_train: int = DEFAULTS["max_train"], max_eval: int = DEFAULTS["max_eval"],
                  threads: int | None = None) -> dict:
    """Train one LoRA adapter of ``task`` and save it with its eval split and metrics.

    ``seed`` drives the head and LoRA initialisation, dropout, the training
    subset and the batch order, so a (task, seed) pair is reproducible.
    ``threads`` (default: :func:`auto_threads`) holds only for this call.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        return _train(task, seed, out_dir, steps, r, lora_alpha, target_modules, batch_size,
                      lr, max_length, max_train, max_eval, torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def auto_threads(limit: int = 2) -> int:
    """Two torch threads, or one when the machine is already busy.

    Intra-op threads spin-wait for each other: with the cores taken by other
    processes a two-thread run was measured 3-4x slower than a one-thread run.
    """
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on every platform
        busy = 0.0
    return 1 if busy >= cpus - 0.5 else max(1, min(limit, cpus))


def _train(task, seed, out_dir, steps, r, lora_alpha, target_modules, batch_size, lr,
           max_length, max_train, max_eval, threads) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    tr_x, tr_y, ev_x, ev_y, label_names = load_task(task, max_train, max_eval, seed)
    torch.manual_seed(seed)
    base = load_minilm_classifier(len(label_names), seed)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=lora_alpha,
                        lora_dropout=0.0, target_modules=list(target_modules))
    model = get_peft_model(base, config)
    # Record the public model id rather than this machine's site-packages path.
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    # Linear warm-up then linear decay: a short run needs the high lr early
    # and a quiet end so the last batches do not decide the weights.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    labels_t = torch.tensor(tr_y)
    model.train()
    t0 = time.perf_counter()
    losses = run_steps(lambda idx: torch.nn.functional.cross_entropy(
        model(**tokenize([tr_x[i] for i in idx], max_length)).logits, labels_t[idx]),
        opt, sched, len(tr_x), batch_size, steps, seed)
    train_s = time.perf_counter() - t0
    acc = _accuracy(predict(model, ev_x, max_length=max_length), ev_y)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Embeddings are never trained; saying so also skips PEFT's hub lookup of
    # the base config (a warning offline).
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    write_eval_json(out / "eval.json", task, ev_x, ev_y, label_names, max_length)
    tail = losses[-max(1, steps // 5):]
    metrics = {
        "task": task, "seed": seed, "steps": steps, "accuracy": acc,
        "majority_accuracy": majority_accuracy(ev_y), "n_train": len(tr_x),
        "n_eval": len(ev_x), "num_labels": len(label_names),
        "final_train_loss": sum(tail) / len(tail), "train_seconds": round(train_s, 2),
        "threads": threads,        "base_model": BASE_MODEL_ID, "recipe": recipe_key(
            steps=steps, r=r, lora_alpha=lora_alpha, target_modules=tuple(target_modules),
            batch_size=batch_size, lr=lr, max_length=max_length, max_train=max_train,
            max_eval=max_eval),
        "hyperparameters": {"r": r, "lora_alpha": lora_alpha, "lr": lr,
                            "target_modules": list(target_modules), "batch_size": batch_size,
                            "max_length": max_length, "max_train": max_train,
                            "max_eval": max_eval},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def write_eval_json(path, task, texts, labels, label_names, max_length=64) -> None:
    data = {"task": task, "label_names": list(label_names), "max_length": max_length,
            "texts": list(texts), "labels": list(labels)}
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n",
                          encoding="utf-8")


def read_eval_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_adapter_model(adapter_dir, num_labels: int, seed: int = 0):
    """Base MiniLM classifier with the adapter of ``adapter_dir`` applied (PEFT)."""
    from peft import PeftModel

    base = load_minilm_classifier(num_labels, seed)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def adapter_predictions(adapter_dir, eval_json=None, limit: int | None = None,
                        batch_size: int = 64) -> tuple[list[int], list[int]]:
    """``(predicted, gold)`` label ids of the adapter in ``adapter_dir`` on a saved eval
    split, row by row (to pair two adapters' answers on the same texts).

    ``eval_json`` defaults to ``adapter_dir/eval.json``; pass the original
    adapter's file to score a compressed or rebuilt copy on the same texts.
    """
    ev = read_eval_json(eval_json or Path(adapter_dir) / "eval.json")
    texts, labels = ev["texts"][:limit], ev["labels"][:limit]
    model = load_adapter_model(adapter_dir, len(ev["label_names"]))
    return predict(model, texts, batch_size, ev.get("max_length", 64)), list(labels)


def evaluate_adapter(adapter_dir, eval_json=None, limit: int | None = None,
                     batch_size: int = 64) -> float:
    """Accuracy of the adapter in ``adapter_dir`` on a saved eval split (arguments as
    :func:`adapter_predictions`)."""
    return _accuracy(*adapter_predictions(adapter_dir, eval_json, limit, batch_size))


def default_cache_dir() -> Path:
    env = os.environ.get("VLORA_TESTBED_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vlora" / "testbed"


def build_testbed(tasks=None, seeds=(0,), cache_dir=None, progress: bool = True,
                  **train_kwargs) -> list[Path]:
    """Train every (task, seed) not already cached; return the adapter folders.

    Adapters live in ``cache_dir/<task>__s<seed>/``; one is reused only when
    its ``metrics.json`` carries the same :func:`recipe_key`. Training goes to
    a temporary folder first so an interrupted run never looks cached.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tasks = list(tasks) if tasks else sorted(TASKS)
    key = recipe_key(**{k: (tuple(v) if k == "target_modules" else v)
                        for k, v in train_kwargs.items() if k in DEFAULTS})
    dirs = []
    for task in tasks:
        for seed in seeds:
            final = root / f"{task}__s{seed}"
            metrics_path = final / "metrics.json"
            if metrics_path.is_file() and json.loads(metrics_path.read_text()).get("recipe") == key:
                dirs.append(final)
                continue
            tmp = root / f".{task}__s{seed}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            m = train_adapter(task, seed, tmp, **train_kwargs)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            dirs.append(final)
            if progress:
                print(f"{task:24s} s{seed:<4d} acc {m['accuracy']:.3f} "
                      f"(majority {m['majority_accuracy']:.3f}) {m['train_seconds']:.0f}s",
                      file=sys.stderr, flush=True)
    return dirs
