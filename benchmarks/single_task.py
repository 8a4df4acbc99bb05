"""One task of a family alone: how fast the same settings learn it with nothing to infer.

Registers a family `FAMILY-one` (FAMILY with every training and test task set to `--task`, given
as JSON) with FAMILY's presets, then runs `benchmarks/learning.py` on it; every flag of
learning.py works, e.g.

    python benchmarks/single_task.py ant-dir --task '{"angle": 0.0}' --seed 0 --minutes 55
    python benchmarks/single_task.py ant-goal --task '{"goal": [2.0, 1.0]}' --minutes 55

Compared with `learning.py FAMILY` under the same flags it separates what one task's behaviour
costs from what many tasks behind one context variable cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

from metapearl.config import PRESETS
from metapearl.tasks import Task, TaskFamily, get_family, register_family

sys.path.insert(0, str(Path(__file__).parent))
import learning  # noqa: E402


def one_task_family(family: str, task: Task) -> TaskFamily:
    """`family` with `task` as its only task, registered as `FAMILY-one`."""
    base = get_family(family)
    example = base.sample_task(np.random.default_rng(0))
    if not isinstance(task, dict) or set(task) != set(example):
        raise SystemExit(f"--task must be a JSON object with a {family} task's keys, "
                         f"e.g. {json.dumps(example)}; got {json.dumps(task)}")

    class OneTask(type(base)):
        name = f"{family}-one"
        task_parameter = f"{json.dumps(task)} only ({family}'s task)"

        def sample_task(self, rng):
            return copy.deepcopy(task)

        def sample_tasks(self, num_train, num_test, rng):
            return ([copy.deepcopy(task) for _ in range(num_train)],
                    [copy.deepcopy(task) for _ in range(num_test)])

    one = copy.copy(base)  # the family's own settings (e.g. a point family's sparse reward)
    one.__class__ = OneTask
    register_family(one)
    if family in PRESETS:  # (a family without a preset table gets the generic presets)
        PRESETS[one.name] = PRESETS[family]
    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family")
    parser.add_argument("--task", required=True, type=json.loads,
                        help="the one task, as JSON (e.g. '{\"angle\": 0.0}')")
    args, rest = parser.parse_known_args()
    one = one_task_family(args.family, args.task)
    sys.argv[1:] = [one.name, *rest]
    learning.main()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__ + "\nusage: single_task.py FAMILY --task JSON [learning.py's flags]")
        sys.exit(0)
    main()
