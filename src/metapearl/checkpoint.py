"""Checkpoints: tensors and plain data only, written atomically, loaded without running code."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 3  # 3: buffers mark trajectory starts
READABLE_VERSIONS = (2, 3)  # a format-2 checkpoint lacks only those marks
CHECKPOINT_NAME = "checkpoints/latest.pt"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used, with the reason."""


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` to run_dir/checkpoints/latest.pt via a temporary file and an atomic rename.

    The previous checkpoint stays intact until the new one is completely on disk; a failed write
    (full disk, lost permissions) removes the partial file and raises CheckpointError.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was kept"
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    except BaseException:  # Ctrl-C mid-write: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


REQUIRED_KEYS = ("config", "iteration", "env_steps", "agent_meta", "agent", "test_tasks")


def load_checkpoint(run_dir: Path, mmap: bool = False) -> dict[str, Any]:
    """Load run_dir's checkpoint onto the CPU with weights_only=True: no pickled code is ever
    executed. (On the CPU whatever the run's device: the buffers' counters are read as numpy
    arrays and a generator's state must be a CPU tensor; loading a module's or an optimizer's
    state copies it to their device.)

    mmap=True maps the file's tensors (on CPU) instead of reading them: a reader that needs only
    the agent or the task sets then never reads the replay buffers.

    Raises CheckpointError for a missing, truncated, corrupt, unsafe (pickled objects other than
    tensors and plain data) or foreign file.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no checkpoint ({CHECKPOINT_NAME}); is it a run?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise CheckpointError(f"cannot load {path}: {_unloadable(e)}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a metapearl checkpoint")
    if state["format_version"] not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']!r}; this metapearl reads "
            f"formats {', '.join(map(str, READABLE_VERSIONS))}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: no {', '.join(missing)}")
    return state


def run_config_values(run_dir: Path) -> dict[str, Any]:
    """The values in run_dir/config.json (parsed as JSON, never executed), not yet validated."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a metapearl run (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_run_config(run_dir: Path):
    """The PEARLConfig stored in run_dir/config.json, validated."""
    from metapearl.config import PEARLConfig

    return PEARLConfig.from_dict(run_config_values(run_dir))


def _unloadable(e: BaseException) -> str:
    """Why torch.load refused a file, in one line (never torch's advice to drop weights_only)."""
    text = str(e).strip()
    code = re.search(r"GLOBAL (\S+)", text)
    if code:
        return f"it refers to code ({code.group(1)}): unsafe, refused without running it"
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    if detail:
        return f"corrupt or not a checkpoint ({detail.group(1)})"
    return f"corrupt or truncated ({_first_line(e)})"


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def config_changes(stored: dict[str, Any], cfg) -> list[str]:
    """The fields, other than RESUME_FIELDS, where `cfg` differs from a stored config dict.

    A field the stored config lacks (added to metapearl after the run was written) counts as its
    default, as `PEARLConfig.from_dict` reads it.
    """
    from metapearl.config import RESUME_FIELDS

    stored, current = {**type(cfg)().to_dict(), **stored}, cfg.to_dict()
    return sorted(k for k in set(stored) | set(current)
                  if k not in RESUME_FIELDS and stored.get(k) != current.get(k))


def check_compatible(state: dict[str, Any], cfg, exempt: tuple[str, ...] = ()) -> None:
    """CheckpointError unless the checkpoint was written by a run with config `cfg` (up to
    RESUME_FIELDS and `exempt`)."""
    changed = [k for k in config_changes(state["config"], cfg) if k not in exempt]
    if changed:
        raise CheckpointError(
            f"the checkpoint was written with another config (differs in {', '.join(changed)})"
        )


def load_state(module: torch.nn.Module | torch.optim.Optimizer, state: Any, what: str) -> None:
    """module.load_state_dict(state), with a CheckpointError naming `what` on a mismatch."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"the checkpoint's {what} does not fit this model ({_first_line(e)})"
        ) from None


def load_agent(run_dir: Path, device: str = "cpu", cfg=None):
    """The trained PEARLAgent of a run, on `device` (only the agent's tensors are read): the one
    its evaluations used, the moving average where the run has `agent_average_iterations`, else
    the last iterate. `cfg` (default: the run's; validated) may differ from the run's config only
    in EVAL_FIELDS and in RESUME_FIELDS, which do not touch the agent."""
    from metapearl.agent import PEARLAgent
    from metapearl.config import EVAL_FIELDS, PEARLConfig

    stored = run_config_values(run_dir)
    cfg = PEARLConfig.from_dict(stored) if cfg is None else cfg.validate()
    changed = [k for k in config_changes(stored, cfg) if k not in EVAL_FIELDS]
    if changed:
        raise CheckpointError(f"the agent of {run_dir} cannot be loaded with another "
                              f"{', '.join(changed)} (only {', '.join(EVAL_FIELDS)} may change)")
    state = load_checkpoint(run_dir, mmap=True)
    check_compatible(state, cfg, EVAL_FIELDS)
    meta = state["agent_meta"]
    agent = PEARLAgent.from_config(
        cfg, meta["obs_dim"], meta["action_dim"], meta["action_low"], meta["action_high"]
    ).to(device)
    key = "averaged_agent" if cfg.agent_average_iterations else "agent"
    if key not in state:
        raise CheckpointError(f"the checkpoint of {run_dir} holds no {key}")
    load_state(agent, state[key], key.replace("_", " "))
    return agent
