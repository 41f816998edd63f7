"""vlora's benchmarks (``python -m benchmarks --help``)."""

import subprocess
from pathlib import Path


def commit() -> str:
    """The short hash of the checked-out commit: which code produced a result."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
