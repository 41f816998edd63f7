"""The benchmark test bed: 50 real PEFT LoRA adapters of MiniLM, trained once and cached.

* ``one-seed``: every task of :mod:`vlora.testbed` (21) from seed 0, the test bed's recipe.
  Seed 0 for all is the common case (transformers' Trainer seeds every run alike).
* ``one-seed-lr``: 12 of those tasks again from seed 0 at half the learning rate: more
  adapters of one seed, as a team that retrains its tasks produces.
* ``independent``: 17 tasks, each from its own seed (100, 101, ...).

``python -m benchmarks.testbed [--root DIR]`` trains what is missing (about 30 s an
adapter on two quiet cores) and prints the folders; the suite calls :func:`ensure`.
``--llm`` builds the LLM test bed instead (:mod:`vlora.testbed.llm`: SmolLM2-135M adapters).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlora.testbed import build_testbed
from vlora.testbed.data import TASKS

DEFAULT_ROOT = Path.home() / ".cache" / "vlora" / "bench-testbed"
LR_VARIANTS = ["rt_sentiment", "rt_subjectivity", "debate_trump_clinton", "word_polarity",
               "word_pleasantness", "word_imagery", "moral_foundation", "roget_category",
               "chat_topic_en", "chat_topic_pt", "chat_turn", "lang_id"]
INDEPENDENT = ["rt_sentiment", "rt_subjectivity", "debate_trump_clinton", "debate_pence_kaine",
               "convention_party", "gop_convention_year", "guardian_pandemic", "word_polarity",
               "moral_foundation", "roget_category", "chat_topic_en", "chat_topic_it",
               "chat_topic_es", "chat_topic_uk", "chat_topic_ja", "chat_turn", "lang_id"]


def ensure(root: Path = DEFAULT_ROOT, progress: bool = True) -> dict[str, list[Path]]:
    """Train every missing adapter under ``root``; returns ``{regime: [folders]}``."""
    root = Path(root)
    one = build_testbed(sorted(TASKS), [0], root / "one-seed", progress=progress)
    lr = build_testbed(LR_VARIANTS, [0], root / "one-seed-lr", progress=progress, lr=2.5e-3)
    ind = [d for i, task in enumerate(INDEPENDENT)
           for d in build_testbed([task], [100 + i], root / "independent", progress=progress)]
    return {"one-seed": one + lr, "independent": ind}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None,
                    help=f"cache folder (default {DEFAULT_ROOT}; with --llm ~/.cache/vlora/llm-testbed)")
    ap.add_argument("--llm", action="store_true",
                    help="build the LLM test bed instead (SmolLM2-135M, LoRA on 210 modules; "
                         "vlora.testbed.llm)")
    ap.add_argument("--steps", type=int, default=None, help="--llm: training steps per adapter")
    ap.add_argument("--limit", type=int, default=None,
                    help="--llm: build only the first N planned adapters")
    args = ap.parse_args(argv)
    if not args.llm and (args.steps is not None or args.limit is not None):
        ap.error("--steps and --limit apply to --llm only")
    start = time.perf_counter()
    if args.llm:
        from vlora.testbed.llm import build_llm_testbed

        steps = {} if args.steps is None else {"steps": args.steps}
        regimes = build_llm_testbed(args.root, limit=args.limit, **steps)
    else:
        regimes = ensure(Path(args.root or DEFAULT_ROOT))
    for regime, dirs in regimes.items():
        print(f"{regime}: {len(dirs)} adapters{' admitted' if args.llm else ''}")
    print(f"test bed ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
