"""Pictures of a run: the learning curve and the adaptation curve (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metapearl.logging import column, read_progress  # noqa: E402


def plot_learning_curve(run_dir: Path) -> Path:
    """Meta-test return (last trajectory) against meta-training env steps."""
    run_dir = Path(run_dir)
    rows = [r for r in read_progress(run_dir / "progress.csv")
            if r.get("AverageReturn_all_test_tasks")]
    steps = column(rows, "Number of env steps total")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(steps, column(rows, "AverageReturn_all_test_tasks"), label="test tasks (online)")
    ax.plot(steps, column(rows, "AverageReturn_all_train_tasks"), label="train tasks (online)",
            alpha=0.6)
    ax.plot(steps, column(rows, "AverageTrainReturn_all_train_tasks"),
            label="train tasks (buffer context)", alpha=0.6, linestyle="--")
    ax.set_xlabel("meta-training env steps")
    ax.set_ylabel("return of the last adaptation trajectory")
    ax.set_title(f"{run_dir.name}: meta-test return")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "plots" / "learning_curve.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_adaptation_curve(run_dir: Path, csv_path: Path | None = None) -> Path:
    """Return of trajectory k in a new task, first and last evaluated iterations."""
    run_dir = Path(run_dir)
    path = csv_path or run_dir / "eval" / "adaptation.csv"
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    iterations = sorted({int(r["iteration"]) for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    shown = iterations if len(iterations) <= 2 else [iterations[0], iterations[len(iterations) // 2],
                                                     iterations[-1]]
    for it in shown:
        pts = sorted((int(r["trajectory"]), float(r["return"])) for r in rows
                     if int(r["iteration"]) == it)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"iteration {it}")
    ax.set_xlabel("trajectory k in the new task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean return of trajectory k")
    ax.set_title(f"{run_dir.name}: adaptation on test tasks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "plots" / ("adaptation_curve.png" if csv_path is None else path.stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
