"""How a trained sparse-point-robot agent explores: where the successes come from.

Runs the meta-test (SPEC section 5) on every test task of a run through the deployment API
(`metapearl.evaluation.adapt_to_task`):
`num_exp_traj_eval` trajectories with z from the prior, then z from the posterior of the sparse
context, until `num_steps_per_eval` steps. Prints the success rate of the last trajectory split by
whether a prior-phase trajectory reached the goal radius, how many tasks ever reach it, the
posterior variance after the prior phase, and how far apart the trajectories of each phase end
(the spread of their end angles on the half circle of goals), and, for the meta-tests that reach the
goal radius before their last trajectory, how often the last one misses it again and how far from
the goal the agent ends at the first hit and at the end (an agent that drifts off a goal it found
ends farther out). `--trace` also prints, for each meta-test whose prior phase found nothing and
for each that found the goal and lost it, the goal's angle and every trajectory's end angle in
degrees, `H` marking those that reached the goal radius: where the posterior sends the agent.

    python benchmarks/sparse_exploration.py runs/sparse-point-robot [--runs 3] [--trace]
        [--online-context all|sampled]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from metapearl.agent import PEARLAgent
from metapearl.checkpoint import load_agent, load_checkpoint, load_run_config
from metapearl.encoder import marginal_variance
from metapearl.evaluation import adapt_to_task
from metapearl.tasks import get_family


def adapt(agent: PEARLAgent, env, cfg, seed: int) -> dict:
    """One meta-test slot (`adapt_to_task`): which trajectories reached the goal radius, where
    they ended, and the posterior variance after the prior phase."""
    k = cfg.num_exp_traj_eval
    var_after_prior = []

    def on_step(trajectory: int, t: int, _return: float) -> None:
        if trajectory == k and t == 0:  # acting on the first posterior
            var_after_prior.append(float(marginal_variance(agent.belief_var).mean()))

    trajectories = adapt_to_task(agent, env, cfg, seed=seed, on_step=on_step)
    # the context reward is 1 - distance inside the goal radius and 0 outside it
    reached = [bool((tr["rewards"] > 0).any()) for tr in trajectories]
    angles = [float(np.arctan2(tr["next_obs"][-1, 1], tr["next_obs"][-1, 0]))
              for tr in trajectories]
    return {"prior_hit": any(reached[:k]), "ever": any(reached), "success": reached[-1],
            "angles": angles, "reached": reached,
            "var": var_after_prior[0] if var_after_prior else None,
            "spread_prior": np.std(angles[:k]), "spread_posterior": np.std(angles[k:])}


def degrees_off(angle: float, goal: float) -> float:
    """Degrees between an end angle (radians) and the goal's angle (degrees), in [0, 180]."""
    return abs((np.degrees(angle) - goal + 180.0) % 360.0 - 180.0)


def found_then(slots: list[dict]) -> tuple[float, float, float, float] | None:
    """Of the meta-tests that reached the goal radius before their last trajectory: their share
    of all, the share of them whose last trajectory missed it, and their mean degrees between end
    and goal at the first hit and at the last trajectory. None if there are none."""
    early = [s for s in slots if any(s["reached"][:-1])]
    if not early:
        return None
    return (len(early) / len(slots), float(np.mean([not s["success"] for s in early])),
            float(np.mean([degrees_off(s["angles"][s["reached"].index(True)], s["goal"])
                           for s in early])),
            float(np.mean([degrees_off(s["angles"][-1], s["goal"]) for s in early])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a sparse-point-robot run (its latest checkpoint is used)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per test task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", action="store_true",
                        help="end angle of every trajectory of each fruitless prior phase")
    parser.add_argument("--online-context", choices=("all", "sampled"), default=None,
                        help="posteriors from all the context gathered so far or from "
                        "embedding_batch_size rows drawn from it (default: the run's "
                        "sample_online_context)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    cfg = load_run_config(run)
    if cfg.family != "sparse-point-robot":
        parser.error(f"{run} is not a sparse-point-robot run")
    if args.online_context is not None:
        cfg.sample_online_context = args.online_context == "sampled"
    agent = load_agent(run, cfg=cfg)  # validates cfg
    agent.generator = torch.Generator().manual_seed(args.seed)
    family = get_family(cfg.family)
    env = family.make_env()
    state = load_checkpoint(run, mmap=True)
    slots = []
    for t, task in enumerate(state["test_tasks"]):
        family.set_task(env, task)
        goal = float(np.degrees(np.arctan2(task["goal"][1], task["goal"][0])))
        slots += [{**adapt(agent, env, cfg, 1000 * (args.seed * 997 + t) + 50 * r), "goal": goal}
                  for r in range(args.runs)]
    col = lambda key, rows=slots: np.array([s[key] for s in rows], float)  # noqa: E731
    hit = col("prior_hit") == 1
    k = cfg.num_exp_traj_eval
    print(f"{run} after {state['iteration']} iterations: {len(slots)} meta-tests "
          f"({len(state['test_tasks'])} test tasks x {args.runs}), {k} prior trajectories of "
          f"{cfg.num_steps_per_eval // cfg.max_path_length}, posteriors from "
          + (f"{agent.online_context_rows} rows drawn from the context"
             if agent.online_context_rows else "all the context"))
    print(f"  success of the last trajectory          {col('success').mean():6.1%}")
    print(f"  a prior trajectory reached the goal     {hit.mean():6.1%}")
    print(f"  any trajectory reached the goal         {col('ever').mean():6.1%}")
    for name, rows in [("after a prior-phase hit", hit), ("without one", ~hit)]:
        if rows.any():
            print(f"  success {name:<31} {col('success')[rows].mean():6.1%}  "
                  f"(posterior variance after the prior phase {col('var')[rows].mean():.3f}, "
                  f"prior 1)")
    print(f"  spread of end angles, prior phase       {col('spread_prior').mean():6.3f} rad")
    print(f"  spread of end angles, posterior phase   {col('spread_posterior').mean():6.3f} rad")
    found = found_then(slots)
    if found is not None:
        print(f"  a hit before the last trajectory        {found[0]:6.1%}, then the last missed in "
              f"{found[1]:.1%}; end {found[2]:.1f} deg from the goal at the first hit, "
              f"{found[3]:.1f} at the last")
    if args.trace:
        def trace(prefix: str, slot: dict) -> None:
            ends = [f"{np.degrees(a):4.0f}{'H' if reached else '.'}"
                    for a, reached in zip(slot["angles"], slot["reached"], strict=True)]
            print(f"  {prefix} {slot['goal']:4.0f} | {' '.join(ends[:k])} | {' '.join(ends[k:])}")

        print("fruitless prior phases: goal angle | end angle of each trajectory (deg, H = reached)")
        for slot in slots:
            if not slot["prior_hit"]:
                trace("goal", slot)
        print("goals found, then missed by the last trajectory: the same")
        for slot in slots:
            if slot["ever"] and not slot["success"]:
                trace("lost", slot)


if __name__ == "__main__":
    main()
