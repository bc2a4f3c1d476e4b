"""The examples run as a user runs them, and show what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_finetune_example_loss_falls_and_matches_the_local_run():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), "--steps", "4"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in result.stdout.splitlines() if line.startswith("| ") and "step" not in line]
    losses = [(float(swarm), float(local)) for _, swarm, local in rows]
    assert len(losses) == 4
    assert all(abs(swarm - local) <= 1e-3 for swarm, local in losses)
    assert losses[-1][0] < losses[0][0] - 0.5  # it learns
