"""The paper's ablations: every variant on one family with several seeds, one figure and a table.

    python benchmarks/ablations.py                       # sparse-point-robot, seeds 0 1 2
    python benchmarks/ablations.py --iterations 150 --jobs 2 --out runs/ablations   # go on
    python benchmarks/ablations.py --report-only --out runs/ablations

Each run is `metapearl train FAMILY --seed S --set <the variant's switch>` on the default preset,
cut to --iterations and evaluated every --eval-interval iterations, in OUT/VARIANT-sS. Every run
meta-tests as SPEC section 5 does: from all the context (`sample_online_context=false`, which
the record predates and the rnn-traj encoder needs), and the last iterate, not an average over
iterations (`agent_average_iterations=0`, which the record also predates). Finished
runs are kept, interrupted ones resumed, so the command can be repeated after a crash; with a
larger --iterations, finished runs go on from their last checkpoint. With --jobs 2
the runs use one torch thread each. At the end: OUT/ablations.md (final success rate and return,
mean +- std over seeds, and whether the paper's orderings hold) and OUT/ablations.png/.svg.

The record in the README is `--iterations 300 --out docs/ablations`: git keeps each run's
config.json, progress.csv and eval/ there and ignores checkpoints, so `--report-only` redraws it
on a fresh clone and the same command goes on with the variants or seeds still missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from metapearl.logging import column, read_progress
from metapearl.plots import plot_ablations

VARIANTS = {  # name -> config overrides (the paper's section 6.3 ablations)
    "pearl": {},
    "rnn-tran": {"encoder": "rnn-tran"},
    "rnn-traj": {"encoder": "rnn-traj"},
    "deterministic": {"use_information_bottleneck": "false"},
    "off-policy": {"context_sampler": "off-policy"},
    "off-policy-rl-batch": {"context_sampler": "off-policy-rl-batch"},
}
PANELS = {  # the paper's three comparisons, each with the ordering the paper found
    "inference network": ["pearl", "rnn-tran", "rnn-traj"],
    "context sampling": ["pearl", "off-policy", "off-policy-rl-batch"],
    "deterministic context": ["pearl", "deterministic"],
}
LABELS = {"pearl": "PEARL (recent, PoG, stochastic)"}


def finished(run: Path, iterations: int) -> bool:
    rows = read_progress(run / "progress.csv") if (run / "progress.csv").exists() else []
    return bool(rows) and int(rows[-1]["Iteration"]) >= iterations - 1


def train_one(args, variant: str, seed: int) -> str:
    run = args.out / f"{variant}-s{seed}"
    if finished(run, args.iterations):
        return f"{run.name}: done before"
    cmd = [sys.executable, "-m", "metapearl", "train", args.family, "--out", str(run),
           "--no-progress"]
    sets = {"num_iterations": args.iterations, "torch_threads": args.threads}
    if (run / "config.json").exists():  # interrupted, or finished with fewer iterations
        cmd.append("--resume")
    else:
        cmd += ["--seed", str(seed)]
        sets.update(VARIANTS[variant], eval_interval=args.eval_interval,
                    sample_online_context="false", agent_average_iterations=0)
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    with (args.out / f"{run.name}.log").open("a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    return f"{run.name}: exit {rc} after {time.perf_counter() - start:.0f} s"


def final(run: Path, name: str, last: int) -> float:
    """Mean of the last `last` evaluations of a progress.csv column."""
    values = [x for x in column(read_progress(run / "progress.csv"), name) if x == x]
    return float(np.mean(values[-last:]))


def _stats(args, last: int) -> dict[str, tuple]:
    """variant -> (success mean, std, return mean, std, seeds) over the last `last` evaluations."""
    stats = {}
    for variant in VARIANTS:
        runs = [args.out / f"{variant}-s{s}" for s in args.seeds]
        runs = [r for r in runs if finished(r, args.iterations)]
        if runs:
            succ = [final(r, "SuccessRate_test_tasks", last) for r in runs]
            ret = [final(r, "AverageReturn_all_test_tasks", last) for r in runs]
            stats[variant] = (np.mean(succ), np.std(succ), np.mean(ret), np.std(ret), len(runs))
    return stats


def _verdicts(args, stats: dict[str, tuple]) -> list[str]:
    lines = []
    for panel, order in PANELS.items():
        missing = [v for v in order if v not in stats or stats[v][4] < len(args.seeds)]
        if missing:  # no verdict on part of the seeds
            lines.append(f"- {panel}: not judged yet; short of {len(args.seeds)} seeds: "
                         f"{', '.join(missing)}")
            continue
        key = [(stats[v][0], stats[v][2]) for v in order]
        holds = all(a >= b for a, b in zip(key[:-1], key[1:], strict=True))
        # a gap in mean success smaller than either side's std over seeds is noise at 3 seeds
        clear = all(stats[a][0] - stats[b][0] > max(stats[a][1], stats[b][1])
                    for a, b in zip(order[:-1], order[1:], strict=True))
        verdict = ("does not hold" if not holds else "holds" if clear
                   else "holds by the means only: a gap is inside the spread over seeds")
        lines.append(f"- {panel}: {' > '.join(order)}: {verdict}"
                     f" (measured: {', '.join(f'{v} {stats[v][0]:.1%}' for v in order)})")
    return lines


def report(args) -> str:
    """The table (final figures, and the same over the last `--window` evaluations) and verdicts."""
    final_stats, window_stats = _stats(args, args.last), _stats(args, args.window)
    lines = [f"# Ablations on {args.family} ({args.iterations} iterations; mean +- std over seeds "
             f"of each run's mean over its last {args.last} (final) or {args.window} evaluations)",
             "", f"| variant | seeds | success rate, final | return, final | success rate, last "
             f"{args.window} | return, last {args.window} |", "|---|---|---|---|---|---|"]
    for variant, (sm, ss, rm, rs, n) in final_stats.items():
        wm, ws, vm, vs, _ = window_stats[variant]
        lines.append(f"| {variant} | {n} | {sm:.1%} +- {ss:.1%} | {rm:.2f} +- {rs:.2f} "
                     f"| {wm:.1%} +- {ws:.1%} | {vm:.2f} +- {vs:.2f} |")
    for name, stats in (("final figures", final_stats),
                        (f"means over the last {args.window} evaluations", window_stats)):
        lines += ["", f"Orderings the paper found, on the {name} (by mean success rate, "
                  "then return):", *_verdicts(args, stats)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sparse-point-robot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--last", type=int, default=2, help="evaluations averaged per run (final)")
    parser.add_argument("--window", type=int, default=10,
                        help="a longer window of evaluations, less noisy than the final figure")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--report-only", action="store_true", help="only table and figure")
    args = parser.parse_args()
    args.threads = 1 if args.jobs > 1 else 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        jobs = [(v, s) for v in args.variants for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda job: train_one(args, *job), jobs):
                print(line, flush=True)
    table = report(args)
    (args.out / "ablations.md").write_text(table)
    groups = {panel: {LABELS.get(v, v): [args.out / f"{v}-s{s}" for s in args.seeds
                                         if finished(args.out / f"{v}-s{s}", args.iterations)]
                      for v in order} for panel, order in PANELS.items()}
    for path in plot_ablations(groups, args.out / "ablations"):
        print(f"figure: {path}")
    print(table)


if __name__ == "__main__":
    main()
