"""Rebuild the shipped example adapters: ``python -m vlora.examples.build [--out DIR]``.

Trains one adapter per task in :data:`EXAMPLE_TASKS` (seed 42, default test-bed
recipe, eval split capped at 200 examples so the package stays small) and
copies the files worth shipping into ``<out>/<task>/``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

EXAMPLE_TASKS = ("chat_topic_en", "debate_trump_clinton", "guardian_pandemic", "lang_id",
                 "moral_foundation", "roget_category", "rt_sentiment", "word_polarity")
SEED = 42
MAX_EVAL = 200
SHIPPED = ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "eval.json")


def build(out: Path, tasks=EXAMPLE_TASKS, cache_dir=None) -> list[Path]:
    from vlora.testbed import build_testbed

    cache = Path(cache_dir or tempfile.mkdtemp(prefix="vlora-examples-"))
    dirs = build_testbed(tasks, [SEED], cache, progress=True, max_eval=MAX_EVAL)
    made = []
    for task, src in zip(tasks, dirs):
        dest = out / task
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in SHIPPED:
            shutil.copy2(src / name, dest / name)
        made.append(dest)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlora.examples.build", description=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "adapters")
    p.add_argument("--cache", type=Path, default=None,
                   help="training cache to reuse (default: a fresh temporary folder)")
    a = p.parse_args(argv)
    for d in build(a.out, cache_dir=a.cache):
        print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
