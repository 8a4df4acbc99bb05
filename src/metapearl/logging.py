"""The run's tabular log: progress.csv, one row per iteration, fixed columns."""

from __future__ import annotations

import csv
import math
from pathlib import Path

EVAL_COLUMNS = (
    "AverageReturn_all_test_tasks", "AverageReturn_all_train_tasks",
    "AverageTrainReturn_all_train_tasks", "SuccessRate_test_tasks", "SuccessRate_train_tasks",
)


class ProgressLog:
    """Appends rows to `progress.csv`; on resume, drops rows past the checkpoint's iteration."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.reader(f)
                self.columns = next(reader, None)

    def truncate(self, keep_iterations: int) -> None:
        """Keep only rows with Iteration < keep_iterations (rows a checkpoint has not seen go)."""
        truncate_csv(self.path, "Iteration", keep_iterations)

    def write(self, row: dict[str, float | int | str | None]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writeheader()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writerow({k: _fmt(v) for k, v in row.items()})


def truncate_csv(path: Path, iteration_column: str, keep_iterations: int) -> None:
    """Rewrite the CSV at `path` (atomically) without rows whose iteration is >= keep_iterations."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        kept = [r for r in reader if int(float(r[iteration_column])) < keep_iterations]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        if columns:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)
    tmp.replace(path)


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def read_progress(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """A numeric column of progress rows, NaN where empty."""
    return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]
