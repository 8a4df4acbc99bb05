"""Learning benchmark: train a family and print env steps, wall seconds and test return per iteration.

    python benchmarks/learning.py point-robot --seed 0 --minutes 10
    python benchmarks/learning.py sparse-point-robot --set num_iterations=200

Prints one line per iteration and, at the end, the first time (wall seconds and env steps) the
test return reached --target, if given.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from metapearl import Trainer, make_config
from metapearl.config import parse_overrides
from metapearl.evaluation import meta_test


class _Stop(Exception):
    pass


def untrained(trainer: Trainer) -> float:
    """Meta-test return of the freshly initialised agent, on envs and a generator of its own (the
    run's generators are left untouched, so the run is the one `metapearl train` makes)."""
    cfg = trainer.cfg
    envs = [trainer.family.make_env() for _ in range(len(trainer.envs))]
    for i, env in enumerate(envs):
        env.reset(seed=10_000 + i)
    gen = torch.Generator(trainer.device).manual_seed(cfg.seed + 10_000)
    return meta_test(trainer.agent, trainer.family, envs, trainer.test_tasks, cfg, gen).final_return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    parser.add_argument("--target", type=float, default=None,
                        help="report when AverageReturn_all_test_tasks first reaches this")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()

    overrides = {**parse_overrides(args.set), "seed": args.seed}
    cfg = make_config(args.family, args.preset, overrides)
    out = args.out or tempfile.mkdtemp(prefix=f"metapearl-{args.family}-")
    trainer = Trainer(cfg, out, progress=False)
    start = time.perf_counter()
    reached: list[tuple[float, int, int]] = []
    returns: list[float] = []
    sets = "".join(f" --set {kv}" for kv in args.set)
    print(f"# {args.family} preset={args.preset} seed={args.seed}{sets} run_dir={out}")
    print(f"# untrained agent: AverageReturn_all_test_tasks {untrained(trainer):.2f}")
    print(f"{'iter':>5} {'env_steps':>10} {'wall_s':>8} {'test_return':>12} {'success':>8}")

    def report(row: dict) -> None:
        wall = time.perf_counter() - start
        ret = row["AverageReturn_all_test_tasks"]
        succ = row["SuccessRate_test_tasks"]
        ret_s = f"{ret:12.2f}" if ret is not None else f"{'':>12}"
        succ_s = f"{succ:8.0%}" if succ is not None else f"{'':>8}"
        print(f"{row['Iteration']:>5} {row['Number of env steps total']:>10} {wall:8.1f} "
              f"{ret_s} {succ_s}", flush=True)
        if ret is not None and not math.isnan(ret):
            returns.append(ret)
        if (args.target is not None and ret is not None and not reached
                and ret >= args.target):
            reached.append((wall, row["Number of env steps total"], row["Iteration"]))
        if args.minutes is not None and wall >= 60 * args.minutes:
            raise _Stop

    try:
        trainer.train(on_iteration=report)
    except _Stop:
        trainer.make_plots()
    if args.target is not None:
        if reached:
            wall, steps, it = reached[0]
            print(f"# reached {args.target} at iteration {it}: {wall:.0f} s, {steps} env steps")
        else:
            print(f"# never reached {args.target}")
    if returns:
        last = returns[-5:]
        print(f"# last {len(last)} evaluations: mean {sum(last) / len(last):.2f}, "
              f"min {min(last):.2f}; best {max(returns):.2f}")


if __name__ == "__main__":
    main()
