"""Checkpoints: tensors and plain data only, written atomically, loaded without running code."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoints/latest.pt"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used, with the reason."""


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` to run_dir/checkpoints/latest.pt via a temporary file and an atomic rename.

    The previous checkpoint stays intact until the new one is completely on disk.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load run_dir's checkpoint with weights_only=True: no pickled code is ever executed."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no checkpoint ({CHECKPOINT_NAME}); is it a run?")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path}: corrupt, truncated or unsafe ({first})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a metapearl checkpoint of format {FORMAT_VERSION}"
        )
    return state


def load_run_config(run_dir: Path):
    """The PEARLConfig stored in run_dir/config.json (parsed as JSON, never executed)."""
    from metapearl.config import PEARLConfig

    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a metapearl run (no config.json)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return PEARLConfig.from_dict(values)


def load_agent(run_dir: Path, device: str = "cpu"):
    """The trained PEARLAgent of a run."""
    from metapearl.agent import PEARLAgent

    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir, device)
    meta = state["agent_meta"]
    agent = PEARLAgent.from_config(
        cfg, meta["obs_dim"], meta["action_dim"], meta["action_low"], meta["action_high"]
    ).to(device)
    agent.load_state_dict(state["agent"])
    agent.reset()
    return agent
