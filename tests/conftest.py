"""Shared fixtures: the real MiniLM model and PEFT adapters made from it by peft itself."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlora.testbed.models import minilm_path  # noqa: E402

# One thread: the suite's matrices are small, and on a shared 2-core machine OpenMP
# threads waiting on each other made a MiniLM forward pass about 15x slower.
torch.set_num_threads(1)

TEXTS = ["the film was a delight from start to finish", "a tedious, overlong mess",
         "what is the capital of france", "i love programming in python"]


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return str(minilm_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def base_classifier(minilm_dir: str, num_labels: int = 3, seed: int = 0):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=num_labels).eval()


@pytest.fixture(scope="session")
def make_peft_adapter(minilm_dir, tmp_path_factory):
    """Save a PEFT LoRA of the real MiniLM with the given LoraConfig options (non-zero B)."""
    from peft import LoraConfig, get_peft_model
    cache: dict = {}

    def make(name: str = "plain", seed: int = 0, dtype: torch.dtype | None = None,
             safe: bool = True, adapter_name: str = "default", **options):
        key = (name, seed, str(dtype), safe, adapter_name, repr(sorted(options.items(), key=str)))
        if key in cache:
            return cache[key]
        model = base_classifier(minilm_dir, seed=seed)
        config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                      init_lora_weights=False)
        config.update(options)
        torch.manual_seed(seed + 1)
        peft_model = get_peft_model(model, LoraConfig(**config), adapter_name=adapter_name)
        if dtype is not None:
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(dtype)
        out = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(str(out), safe_serialization=safe)
        cache[key] = (out, peft_model.eval())
        return cache[key]

    return make
