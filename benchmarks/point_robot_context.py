"""Which context lets a trained point-robot agent find its goal? Measured through the deployment API.

For every test task of a run (and `--runs` repetitions), build the context one way, infer the
posterior, then score one deterministic trajectory with z drawn from that posterior (as the
meta-test's last trajectory is scored). The ways:

- the meta-test's own: 2 deterministic trajectories, the 1st under the prior, the 2nd under the
  posterior of the 1st; then the same with the final z = the posterior mean instead of a draw;
- the same 2 trajectories with the stochastic (training) policy: is it the determinism?
- 4 deterministic trajectories: does more of the same context help?
- 10 stochastic 4-step pieces under the prior from 10 random starts (40 transitions, as many as
  2 trajectories but from 10 places) and 10 whole stochastic trajectories under the prior (200
  transitions, what the encoder buffer holds in training).

The first line gives the oracle on the run's own test tasks (a goal-aware policy stepping straight
at the goal from the same kind of random starts): test sets differ in how hard they are, e.g.
-4.76 to -5.60 over point-robot seeds 0-4, against -5.19 over all goals.

    python benchmarks/point_robot_context.py runs/point-robot [--runs 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metapearl.agent import PEARLAgent
from metapearl.checkpoint import load_checkpoint, load_run_config
from metapearl.tasks import get_family

# name -> (context pieces: (steps, deterministic, infer the posterior after it), final z draw)
WAYS = {
    "meta-test: 2 deterministic trajectories": ([(20, True, True)] * 2, "sample"),
    "  same, final z = posterior mean": ([(20, True, True)] * 2, "mean"),
    "2 stochastic trajectories": ([(20, False, True)] * 2, "sample"),
    "4 deterministic trajectories": ([(20, True, True)] * 4, "sample"),
    "10 stochastic 4-step pieces, prior": ([(4, False, False)] * 10, "sample"),
    "10 stochastic trajectories, prior": ([(20, False, False)] * 10, "sample"),
}


def score(agent: PEARLAgent, env, pieces, final: str, seed: int) -> float:
    """Return of the deterministic trajectory after building the context from `pieces`."""
    agent.reset()
    for k, (steps, deterministic, infer) in enumerate(pieces):
        agent.sample_z()
        obs, _ = env.reset(seed=seed + k)
        for _ in range(steps):
            action = agent.act(obs, deterministic)
            next_obs, reward, *_ = env.step(action)
            agent.observe(obs, action, reward, next_obs)
            obs = next_obs
        if infer:
            agent.infer_posterior()
    agent.infer_posterior()
    if final == "mean":
        agent.z = agent.belief_mu.clone()
    else:
        agent.sample_z()
    obs, _ = env.reset(seed=seed + len(pieces))
    ret = 0.0
    for _ in range(20):
        obs, reward, *_ = env.step(agent.act(obs))
        ret += reward
    return ret


def oracle(env, seed: int) -> float:
    """Return of the goal-aware policy (the box-clipped step straight at the goal is the nearest
    reachable point to it at every step, so it is optimal) from the start of reset(seed)."""
    obs, _ = env.reset(seed=seed)
    ret = 0.0
    for _ in range(20):
        obs, reward, *_ = env.step(np.clip(env.unwrapped.goal - obs, -0.1, 0.1))
        ret += reward
    return ret


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a point-robot run (its latest checkpoint is used)")
    parser.add_argument("--runs", type=int, default=10, help="repetitions per test task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = Path(args.run_dir)
    if load_run_config(run).family != "point-robot":
        parser.error(f"{run} is not a point-robot run")
    agent = PEARLAgent.load(run)
    agent.generator = torch.Generator().manual_seed(args.seed)
    family = get_family("point-robot")
    env = family.make_env()
    tasks = load_checkpoint(run, mmap=True)["test_tasks"]
    best = []
    for t, task in enumerate(tasks):
        family.set_task(env, task)
        best += [oracle(env, 10**6 + 1000 * t + r) for r in range(max(args.runs, 100))]
    print(f"{run}: return of a deterministic trajectory after each context, mean over "
          f"{len(tasks)} test tasks x {args.runs} runs (goal-aware oracle on these tasks "
          f"{np.mean(best):.2f}, over all goals -5.19; random policy -21.45)")
    for name, (pieces, final) in WAYS.items():
        returns = []
        for t, task in enumerate(tasks):
            family.set_task(env, task)
            returns += [score(agent, env, pieces, final, 1000 * (args.seed * 997 + t) + 50 * r)
                        for r in range(args.runs)]
        print(f"  {name:<42} {np.mean(returns):7.2f}")


if __name__ == "__main__":
    main()
