"""Where does a trained ant-dir agent walk in each task? Measured through the deployment API.

For each of ant-dir's two tasks and `--runs` repetitions, run the meta-test's trajectories
(deterministic policy; z from the prior for the first `num_exp_traj_eval`, then from the posterior
of all trajectories so far) and print, per trajectory, the mean of the drawn z, the torso's
displacement (dx, dy) in metres, the return and the length.

    python benchmarks/ant_dir_gaits.py runs/ant-dir [--runs 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from metapearl.agent import PEARLAgent
from metapearl.checkpoint import load_run_config
from metapearl.tasks import get_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--runs", type=int, default=3, help="meta-tests per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = load_run_config(args.run_dir)
    if cfg.family != "ant-dir":
        parser.error(f"{args.run_dir} is not an ant-dir run (family {cfg.family})")
    agent = PEARLAgent.load(args.run_dir)
    agent.generator = torch.Generator().manual_seed(args.seed)
    family = get_family("ant-dir")
    env = family.make_env()
    trajectories = cfg.num_steps_per_eval // cfg.max_path_length
    for k, task in enumerate(family.tasks):
        family.set_task(env, task)
        for run in range(args.runs):
            agent.reset()
            env.reset(seed=args.seed * 1000 + 100 * k + run)
            print(f"task {k} (angle {task['angle']:.2f}), run {run}")
            for traj in range(trajectories):
                if traj >= cfg.num_exp_traj_eval:
                    agent.infer_posterior()
                agent.sample_z()
                obs, _ = env.reset()
                start = env.unwrapped.data.body("torso").xpos[:2].copy()
                ret, steps = 0.0, 0
                for _ in range(cfg.max_path_length):
                    steps += 1
                    action = agent.act(obs)
                    next_obs, reward, terminated, _, _ = env.step(action)
                    agent.observe(obs, action, reward, next_obs)
                    ret, obs = ret + reward, next_obs
                    if terminated:
                        break
                dx, dy = env.unwrapped.data.body("torso").xpos[:2] - start
                z = np.array2string(agent.z.numpy()[0], precision=2, suppress_small=True)
                print(f"  trajectory {traj + 1}: z {z}  dx {dx:+6.2f} dy {dy:+6.2f}  "
                      f"return {ret:7.1f}  steps {steps}")


if __name__ == "__main__":
    main()
