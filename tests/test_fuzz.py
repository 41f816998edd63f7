"""Fuzzing the readers with hypothesis, bounded for CI.

Every target mutates a good file (benchmarks/fuzz.py has the mutators and the oracle:
a correct, usable load or a VLoRAError naming the file; never another exception,
never past the per-case time limit, never an allocation beyond 1 GiB of headroom).
Hypothesis drives the mutators through a ``random.Random`` it records, so a failure
shrinks to a small reproducer. The long run is ``python -m benchmarks.fuzz --cases 5000``;
``VLORA_FUZZ_SCALE=10`` multiplies the examples here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from benchmarks import fuzz
except ImportError:  # a bare `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import fuzz

SCALE = float(os.environ.get("VLORA_FUZZ_SCALE", "1"))
EXAMPLES = {"adapter_bytes": 60, "adapter_header": 100, "adapter_tensors": 60, "adapter_config": 100,
            "adapter_bin": 50, "minilm": 25, "subspace_data": 60, "manifest": 100}
TIME_LIMIT_S = 10.0


@pytest.fixture(scope="module")
def seeds(make_peft_adapter):
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # no fsync cost per case
    root = Path(tempfile.mkdtemp(prefix="vlora-fuzz-", dir=shm))
    minilm, _ = make_peft_adapter("rt")  # a real PEFT LoRA of MiniLM (shared with test_io)
    try:
        yield fuzz.make_seeds(root / "seeds", minilm)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_fuzz(target, seeds):
    outcomes: Counter = Counter()
    case = seeds.root.parent / f"case-{target}"

    @settings(max_examples=max(1, int(EXAMPLES[target] * SCALE)), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(rnd=st.randoms(use_true_random=False))
    def one(rnd):
        outcomes[fuzz.run_case(target, rnd, seeds, case, TIME_LIMIT_S)] += 1

    one()
    print(f"\n{target}: {sum(outcomes.values())} cases")
    for outcome, n in outcomes.most_common():
        print(f"  {n:5d}  {outcome}")
    assert len(outcomes) >= 2  # mutators that always end the same way would test little


def test_oracle_rejects_what_it_should(seeds, tmp_path):
    """The oracle itself: a foreign exception, a silent NaN, a hang all fail a case."""
    with pytest.raises(fuzz.FuzzFailure, match="escaped"):
        fuzz._expect_vlora_error(KeyError("x"), ["f"])
    with pytest.raises(fuzz.FuzzFailure, match="does not name"):
        fuzz._expect_vlora_error(fuzz.VLoRAError("no path here"), ["/some/file"])
    with pytest.raises(fuzz.FuzzFailure, match="not finite"):
        fuzz._check_finite(torch.tensor([1.0, float("nan")]), "x")
    with pytest.raises(fuzz.CaseTimeout), fuzz.time_limit(0.2):
        while True:
            pass
    if fuzz._vm_size() is not None:  # Linux: a reservation past the headroom fails
        with pytest.raises(RuntimeError), fuzz.memory_headroom(64 << 20):
            torch.empty(1 << 30, dtype=torch.uint8)
