"""The run's logs: progress.csv (one row per iteration, fixed columns) and, optionally, the same
scalars as TensorBoard event files."""

from __future__ import annotations

import csv
import math
from pathlib import Path


class LogError(ValueError):
    """A run's CSV log cannot be read (a damaged line, not UTF-8, or not a metapearl log)."""


class ProgressLog:
    """Appends rows to `progress.csv`, under the header it already has (a resumed run's)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.reader(f)
                self.columns = next(reader, None)

    def write(self, row: dict[str, float | int | str | None]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writeheader()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writerow({k: _fmt(v) for k, v in row.items()})


class TensorBoardLog:
    """progress.csv's numeric columns as TensorBoard scalars (events.* in the run directory).

    The step is the env-step count. On resume, events past the checkpoint are purged, as rows of
    progress.csv are. Needs the optional `tensorboard` extra.
    """

    def __init__(self, run_dir: Path, resume: bool = False, resume_env_steps: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from metapearl.tasks import MissingExtraError

            raise MissingExtraError("tensorboard=true needs TensorBoard: "
                                    "pip install -e '.[tensorboard]' in the metapearl checkout") from None
        purge = resume_env_steps + 1 if resume else None
        self.writer = SummaryWriter(str(run_dir), purge_step=purge)

    def write(self, row: dict) -> None:
        step = int(row["Number of env steps total"])
        for name, value in row.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def truncate_csv(path: Path, iteration_column: str, keep_iterations: int) -> None:
    """Rewrite the CSV at `path` (atomically) without rows whose iteration is >= keep_iterations."""
    path = Path(path)
    if not path.exists():
        return
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            kept = [r for r in reader if int(float(r[iteration_column])) < keep_iterations]
    except (ValueError, KeyError, TypeError) as e:
        raise LogError(f"{path} cannot be read ({type(e).__name__}: {e}); mend or remove the "
                       "damaged lines") from None
    tmp = path.with_suffix(".tmp")
    try:
        with tmp.open("w", newline="") as f:
            if columns:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(kept)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone already after the rename)


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def read_progress(path: Path) -> list[dict[str, str]]:
    """The rows of a progress.csv, each value a number or empty (else LogError)."""
    try:
        with Path(path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        for line, row in enumerate(rows, start=2):
            for name, value in row.items():
                if name is None or value is None or (value and _not_a_number(value)):
                    raise LogError(f"{path}, line {line}: {name!r} holds {value!r}, not a number")
    except UnicodeDecodeError as e:
        raise LogError(f"{path} is not a metapearl log (not UTF-8: {e.reason})") from None
    return rows


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """A numeric column of progress rows, NaN where empty."""
    return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]
