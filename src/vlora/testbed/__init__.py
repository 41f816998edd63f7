"""Real test bed: PEFT LoRA adapters of all-MiniLM-L6-v2 trained on real text, offline.

Importing this package is cheap (no torch); training and evaluation import
torch, transformers and peft on first use.

    from vlora.testbed import TASKS, load_task, build_testbed, evaluate_adapter
    dirs = build_testbed(["rt_sentiment", "lang_id"], seeds=[0, 1])
    acc = evaluate_adapter(dirs[0])

Command line: ``python -m vlora.testbed --help``.
"""

from .data import TASKS, TaskSpec, load_task, task_summary
from .models import (
                     load_minilm_classifier,
                     load_smollm2,
                     minilm_path,
                     minilm_tokenizer,
                     smollm2_gguf_path,
                     tokenize,
)
from .train import (
                     RECIPE_VERSION,
                     adapter_predictions,
                     build_testbed,
                     default_cache_dir,
                     evaluate_adapter,
                     load_adapter_model,
                     read_eval_json,
                     train_adapter,
)

__all__ = [
    "RECIPE_VERSION", "TASKS", "TaskSpec", "adapter_predictions", "build_testbed", "default_cache_dir",
    "evaluate_adapter", "load_adapter_model", "load_minilm_classifier", "load_smollm2",
    "load_task", "minilm_path", "minilm_tokenizer", "read_eval_json", "smollm2_gguf_path",
    "task_summary", "tokenize", "train_adapter",
]
