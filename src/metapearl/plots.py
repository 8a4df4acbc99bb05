"""Pictures of runs: learning curves over seeds, adaptation curves, exploration and the posterior.

Every figure is written as PNG and SVG. Runs are grouped (seeds of one configuration, or one
variant of an ablation); a group's curve is the mean over its runs with a band of +- one standard
deviation, over the evaluations all its runs share.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from metapearl.checkpoint import CheckpointError  # noqa: E402
from metapearl.encoder import marginal_variance  # noqa: E402
from metapearl.logging import read_progress  # noqa: E402

Groups = dict[str, list[Path]]
RETURN = "AverageReturn_all_test_tasks"
SUCCESS = "SuccessRate_test_tasks"


class PlotError(CheckpointError):
    """A run directory cannot be plotted (missing files, nothing evaluated yet, bad grouping)."""


def _save(fig, stem: Path, tight_layout: bool = True) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    if tight_layout:
        fig.tight_layout()
    paths = [stem.parent / (stem.name + suffix) for suffix in (".png", ".svg")]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _config(run: Path) -> dict:
    """The run's config with every field (those added after the run was written at defaults)."""
    from metapearl.config import PEARLConfig

    try:
        return PEARLConfig.from_dict(json.loads((run / "config.json").read_text())).to_dict()
    except (OSError, ValueError) as e:
        raise PlotError(f"{run} is not a metapearl run directory (config.json: {e})") from None


def group_runs(specs: list[str], by: str | None = None) -> Groups:
    """Group run directories for plotting.

    `specs` are run directories, each optionally prefixed with a label (``LABEL=RUN_DIR``); runs
    with the same label form a group. Unlabelled runs are grouped by the value of config key `by`,
    or, without `by`, by their whole config except the seed (named by the keys that differ between
    groups, or by the family when all agree).
    """
    labelled: Groups = {}
    plain: list[Path] = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if sep and not Path(spec).exists():
            labelled.setdefault(label, []).append(Path(path))
        else:
            plain.append(Path(spec))
    runs = [*plain, *(r for g in labelled.values() for r in g)]
    seen: set[Path] = set()
    for run in runs:
        if run.resolve() in seen:
            raise PlotError(f"{run} is given twice; a run counts once")
        seen.add(run.resolve())
    configs = {run: _config(run) for run in runs}
    if by is not None:
        for run in plain:
            if by not in configs[run]:
                raise PlotError(f"config key {by!r} not in {run}/config.json")
            labelled.setdefault(f"{by}={configs[run][by]}", []).append(run)
        return labelled
    ignore = {"seed", "torch_threads", "cpu_gemm", "cuda_graphs", "device"}
    keys = {run: tuple(sorted((k, json.dumps(v)) for k, v in configs[run].items()
                              if k not in ignore)) for run in plain}
    distinct = sorted(set(keys.values()))
    varying = sorted({k for key in distinct for k, _ in key
                      if len({dict(d)[k] for d in distinct if k in dict(d)}) > 1})
    def label(run: Path, names: list[str]) -> str:
        return ", ".join(f"{k}={configs[run][k]}" for k in names) or configs[run]["family"]

    # runs of several families or presets differ in many keys: their names alone, where enough
    short = [k for k in ("family", "preset") if k in varying]
    if short and len({label(run, short) for run in plain}) == len(distinct):
        varying = short
    for run in plain:
        labelled.setdefault(label(run, varying), []).append(run)
    return labelled


def _aligned(runs: list[Path], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values (runs, evals)) at the iterations evaluated in every run."""
    tables = []
    for run in runs:
        if not (run / "progress.csv").exists():
            raise PlotError(f"{run} has no progress.csv yet")
        rows = [r for r in read_progress(run / "progress.csv") if r.get(name)]
        tables.append({int(r["Iteration"]): (float(r["Number of env steps total"]), float(r[name]))
                       for r in rows})
    common = sorted(set.intersection(*(set(t) for t in tables)))
    steps = np.array([[t[i][0] for i in common] for t in tables]).mean(axis=0)
    values = np.array([[t[i][1] for i in common] for t in tables])
    return steps, values


def _band(ax, x, values: np.ndarray, label: str, **style) -> None:
    mean = values.mean(axis=0)
    line, = ax.plot(x, mean, label=f"{label} (n={len(values)})", **style)
    if len(values) > 1:
        std = values.std(axis=0)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def learning_curves(groups: Groups, stem: Path, name: str = RETURN) -> list[Path]:
    """Test return (or another progress.csv column) against env steps, one band per group."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        steps, values = _aligned(runs, name)
        if len(steps) == 0:
            raise PlotError(f"the runs of {label!r} share no evaluated iteration with {name}")
        _band(ax, steps, values, label, marker="o" if len(steps) < 15 else None, ms=3)
    ax.set_xlabel("meta-training env steps")
    ax.set_ylabel({RETURN: "meta-test return (last adaptation trajectory)",
                   SUCCESS: "meta-test success rate"}.get(name, name))
    several = any(len(runs) > 1 for runs in groups.values())
    ax.set_title("Learning curves: mean and +-1 std over seeds" if several else "Learning curve"
                 + ("s" if len(groups) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def _adaptation(run: Path, csv_name: str = "adaptation.csv") -> tuple[int, np.ndarray]:
    """(iteration, returns of trajectory k = 1..K) of the last test-task evaluation in
    run/eval/csv_name."""
    path = run / "eval" / csv_name
    if not path.exists():
        raise PlotError(f"{run} has no eval/adaptation.csv yet")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    if not rows:
        raise PlotError(f"{run} has no test-task evaluation in eval/{csv_name} yet")
    last = max(int(r["iteration"]) for r in rows)
    pts = sorted((int(r["trajectory"]), float(r["return"])) for r in rows
                 if int(r["iteration"]) == last)
    return last, np.array([p[1] for p in pts])


def adaptation_curves(groups: Groups, stem: Path, csv_name: str = "adaptation.csv") -> list[Path]:
    """Return of trajectory k in a new test task, after the run's last evaluation, per group."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        curves = [_adaptation(run, csv_name)[1] for run in runs]
        k = min(len(c) for c in curves)
        _band(ax, np.arange(1, k + 1), np.array([c[:k] for c in curves]), label, marker="o",
              ms=3)
    ax.set_xlabel("trajectory k in the new task (k-1 trajectories of context before it)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean return of trajectory k over test tasks")
    ax.set_title("Adaptation: return grows as context accumulates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def plot_ablations(panels: dict[str, Groups], stem: Path) -> list[Path]:
    """One column per comparison, success rate (top) and return (bottom) against env steps."""
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, (title, groups) in enumerate(panels.items()):
        for row, name in enumerate((SUCCESS, RETURN)):
            ax = axes[row, col]
            for label, runs in groups.items():
                if runs:
                    _band(ax, *_aligned(runs, name), label, marker="o", ms=3)
            ax.set_title(title if row == 0 else "")
            ax.set_xlabel("meta-training env steps")
            ax.set_ylabel("test success rate" if name == SUCCESS else "test return")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, stem)


# --- pictures of a trained agent adapting -------------------------------------------------------
def adaptation_rollouts(run: Path, num_tasks: int = 3, trajectories: int | None = None,
                        seed: int = 0) -> list[dict]:
    """Run the trained agent of `run` on its first `num_tasks` test tasks, as the meta-test does
    (`evaluation.adapt_to_task`; at most `trajectories` trajectories when given).

    Per task: {"task", "trajectories" (list of (obs, next_obs) arrays), "returns",
    "posterior" (list over context sizes n of (n, mu, var))}; the posterior is re-inferred from
    the first n transitions for a grid of n, as the agent infers it (a draw of them with
    `sample_online_context`).
    """
    from metapearl.agent import PEARLAgent
    from metapearl.checkpoint import load_checkpoint, load_run_config
    from metapearl.evaluation import adapt_to_task
    from metapearl.tasks import get_family

    cfg = load_run_config(run)
    agent = PEARLAgent.load(run)
    agent.generator = torch.Generator().manual_seed(seed)
    family = get_family(cfg.family)
    tasks = load_checkpoint(run, mmap=True)["test_tasks"][:num_tasks]
    env = family.make_env()
    out = []
    for i, task in enumerate(tasks):
        family.set_task(env, task)
        runs = adapt_to_task(agent, env, cfg, trajectories, seed=seed * 100 + i)
        trajs = [(r["obs"], r["next_obs"]) for r in runs]
        returns = [float(r["rewards"].sum()) for r in runs]
        context = agent.context
        sizes = np.unique(np.geomspace(1, context.shape[1], 40).astype(int))
        with torch.no_grad():
            beliefs = [(0, agent.prior(1))] + [
                (int(n), agent.online_posterior(context[:, :n], agent.generator)) for n in sizes]
        posterior = [(n, mu[0].numpy(), marginal_variance(var)[0].numpy())
                     for n, (mu, var) in beliefs]
        out.append({"task": task, "trajectories": trajs, "returns": returns,
                    "posterior": posterior})
    env.close()
    return out


def exploration(run: Path, stem: Path, rollouts: list[dict]) -> list[Path]:
    """2-D families: the successive adaptation trajectories over the goal region, per task."""
    if "goal" not in rollouts[0]["task"] or rollouts[0]["trajectories"][0][0].shape[-1] != 2:
        raise PlotError("the exploration picture is for 2-D navigation families (a 'goal' task "
                        "and 2-D observations)")
    cfg = _config(run)
    # shared limits: with equal aspect every panel gets the same square, and titles cannot collide
    fig, axes = plt.subplots(1, len(rollouts), figsize=(4.2 * len(rollouts), 4.2), squeeze=False,
                             sharex=True, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, r in zip(axes[0], rollouts, strict=True):
        goal = np.array(r["task"]["goal"])
        if cfg["family"] == "sparse-point-robot":
            angle = np.linspace(0, np.pi, 100)
            ax.plot(np.cos(angle), np.sin(angle), color="0.8", lw=1, label="possible goals")
        ax.add_patch(plt.Circle(goal, 0.2, color="tab:red", alpha=0.2, label="goal radius"))
        ax.plot(*goal, "*", color="tab:red", ms=12)
        n = len(r["trajectories"])
        for k, (obs, next_obs) in enumerate(r["trajectories"]):
            xy = np.vstack([obs[:1], next_obs])
            ax.plot(xy[:, 0], xy[:, 1], color=cmap(k / max(n - 1, 1)), lw=1.2, alpha=0.9)
        ax.set_aspect("equal")
        ax.set_title(f"goal ({goal[0]:.2f}, {goal[1]:.2f})\nreturns, trajectory 1 -> {n}: "
                     f"{r['returns'][0]:.1f} -> {r['returns'][-1]:.1f}", fontsize=9)
        ax.grid(alpha=0.3)
    (x0, x1), (y0, y1) = axes[0, 0].get_xlim(), axes[0, 0].get_ylim()
    fig.set_figheight(4.2 * min((y1 - y0) / (x1 - x0), 1.0) + 1.0)  # the panels' height, no blank
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, len(rollouts[0]["trajectories"])))
    bar = fig.colorbar(sm, ax=axes[0].tolist(), label="trajectory k", shrink=0.8)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{run.name}: exploration then exploitation in new test tasks "
                 f"(posterior re-inferred after trajectory {cfg['num_exp_traj_eval']} and on)")
    return _save(fig, stem, tight_layout=False)


def posterior(run: Path, stem: Path, rollouts: list[dict]) -> list[Path]:
    """The belief narrowing: posterior variance and mean against the number of context transitions."""
    fig, (ax_var, ax_mu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rollouts):
        n = np.array([p[0] for p in r["posterior"]])
        mu = np.array([p[1] for p in r["posterior"]])
        var = np.array([p[2] for p in r["posterior"]])
        color = f"C{i}"
        ax_var.plot(n, var.mean(axis=1), color=color, label=f"test task {i + 1}")
        ax_mu.plot(n, mu[:, 0], color=color, label=f"test task {i + 1}: z[0]")
        if mu.shape[1] > 1:
            ax_mu.plot(n, mu[:, 1], color=color, ls="--", label=f"test task {i + 1}: z[1]")
        ax_mu.fill_between(n, mu[:, 0] - np.sqrt(var[:, 0]), mu[:, 0] + np.sqrt(var[:, 0]),
                           color=color, alpha=0.15, lw=0)
    for ax in (ax_var, ax_mu):
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)  # 0 (the prior) on a log-like axis
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("context transitions (0: the prior)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if np.all([p[2] == 0 for r in rollouts for p in r["posterior"][1:]]):
        ax_var.set_title("deterministic z: no posterior variance")
    else:
        ax_var.set_yscale("log")
        ax_var.set_title("posterior variance (mean over latent dims)")
    ax_var.set_ylabel("sigma^2")
    ax_mu.set_ylabel("posterior mean (band: +-1 sigma of z[0])")
    ax_mu.set_title("posterior mean of the first latent dims")
    fig.suptitle(f"{run.name}: q(z | c) as context accumulates in new test tasks")
    return _save(fig, stem)


def plot_run(run_dir: Path) -> list[Path]:
    """The figures `metapearl train` writes at the end of a run: learning and adaptation curves."""
    run = Path(run_dir)
    paths = []
    if (run / "progress.csv").exists():
        paths += learning_curves({run.name: [run]}, run / "plots" / "learning_curve")
    if (run / "eval" / "adaptation.csv").exists():
        paths += adaptation_curves({run.name: [run]}, run / "plots" / "adaptation_curve")
    return paths
