"""Where does a trained ant-dir or ant-goal agent walk in each task? Measured through the
deployment API.

For each task and `--runs` repetitions, run the meta-test on that task (`adapt_to_task`:
deterministic policy; z from the prior for the first `num_exp_traj_eval` trajectories, then from
the posterior of the trajectories so far) and print, per trajectory, the drawn z, the torso's
displacement (dx, dy) in metres, the return and the length; for ant-goal also the torso's L1
distance to the goal (the reward's term) at the trajectory's start and at its end.
The tasks: the run's first `--tasks` test tasks (ant-dir has two).

    python benchmarks/ant_gaits.py runs/ant-dir [--runs 3]
    python benchmarks/ant_gaits.py runs/ant-goal [--tasks 8] [--runs 1]

A run of `benchmarks/single_task.py ant-dir|ant-goal` works too (its one task).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from metapearl.agent import PEARLAgent
from metapearl.checkpoint import load_checkpoint, load_run_config
from metapearl.evaluation import adapt_to_task
from metapearl.tasks import AntDir, AntGoal, get_family

sys.path.insert(0, str(Path(__file__).parent))
from single_task import one_task_family  # noqa: E402


class Odometer(gym.Wrapper):
    """Remembers where the torso was at the last reset."""

    def torso_xy(self) -> np.ndarray:
        return self.env.unwrapped.data.body("torso").xpos[:2].copy()

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.start = self.torso_xy()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--runs", type=int, default=3, help="meta-tests per task")
    parser.add_argument("--tasks", type=int, default=8,
                        help="test tasks to meta-test (ant-dir has 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.runs < 1 or args.tasks < 1:
        parser.error("--runs and --tasks must be at least 1")

    torch.set_num_threads(1)
    state = load_checkpoint(args.run_dir, mmap=True)
    tasks = state["test_tasks"][:args.tasks]
    name = state["config"]["family"]
    if name.endswith("-one"):  # a benchmarks/single_task.py run: its family, registered again
        one_task_family(name.removesuffix("-one"), tasks[0])
    cfg = load_run_config(args.run_dir)
    family = get_family(cfg.family)
    if not isinstance(family, (AntDir, AntGoal)):
        parser.error(f"{args.run_dir} is not an ant-dir or ant-goal run (family {cfg.family})")
    agent = PEARLAgent.load(args.run_dir)
    agent.generator = torch.Generator().manual_seed(args.seed)
    task_env = family.make_env()
    env = Odometer(task_env)
    rows: dict[int, str] = {}  # trajectory -> its line, as of its latest step
    goal = None  # ant-goal: the current task's goal, read by on_step

    def on_step(traj: int, t: int, ret: float) -> None:
        dx, dy = env.torso_xy() - env.start
        z = np.array2string(agent.z.numpy()[0], precision=2, suppress_small=True)
        to_goal = (f"  to goal {np.abs(env.start - goal).sum():4.2f} -> "
                   f"{np.abs(env.torso_xy() - goal).sum():4.2f}" if goal is not None else "")
        rows[traj] = (f"  trajectory {traj + 1}: z {z}  dx {dx:+6.2f} dy {dy:+6.2f}{to_goal}  "
                      f"return {ret:7.1f}  steps {t + 1}")

    for k, task in enumerate(tasks):
        family.set_task(task_env, task)
        goal = np.asarray(task["goal"]) if "goal" in task else None
        what = f"angle {task['angle']:.2f}" if goal is None else f"goal {goal[0]:+.2f}, {goal[1]:+.2f}"
        for run in range(args.runs):
            rows.clear()
            adapt_to_task(agent, env, cfg, seed=args.seed * 1000 + 100 * k + run,
                          on_step=on_step)
            print(f"task {k} ({what}), run {run}")
            print("\n".join(rows[traj] for traj in sorted(rows)))


if __name__ == "__main__":
    main()
