"""Where a run's checkpoints are: ``<trainer.output_dir>/checkpoints/step_NNNNNN``, usable once ``COMPLETE`` is in
them (written last, see ``Trainer.save``), with the driver's state in ``trainer_state.json``.

Import-light (no torch, no Ray): ``ivgr-dist train`` asks :func:`latest_checkpoint` before it starts anything,
to say "nothing to do" at once for a finished job, and ``Trainer.maybe_resume`` resumes from the same one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Checkpoint", "latest_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and the driver state saved in it."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        """The RL step it was written after."""
        return int(self.state["step"])


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (incomplete ones are ignored), or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file())
    if not done:
        return None
    path = done[-1]
    return Checkpoint(path, json.loads((path / "trainer_state.json").read_text()))
