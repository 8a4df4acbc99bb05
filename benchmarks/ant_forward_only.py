"""ant-dir with its forward task only: how fast the same settings learn a single gait.

Registers a family `ant-fwd` (ant-dir with the one task "walk forward", through the task-family
API) with ant-dir's presets, then runs `benchmarks/learning.py` on it; every flag of learning.py
works, e.g.

    python benchmarks/ant_forward_only.py --seed 0 --minutes 55 --set net_size=64 ...

Compared with `learning.py ant-dir` under the same flags it separates what a gait costs from
what two opposite gaits behind one context variable cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

from metapearl.config import PRESETS
from metapearl.tasks import register_family
from metapearl.tasks.locomotion import AntDir

sys.path.insert(0, str(Path(__file__).parent))
import learning  # noqa: E402


class AntForward(AntDir):
    name = "ant-fwd"
    task_parameter = "direction angle 0 only (ant-dir's forward task)"
    tasks = ({"angle": 0.0},)


if __name__ == "__main__":
    register_family(AntForward())
    PRESETS["ant-fwd"] = PRESETS["ant-dir"]
    sys.argv[1:1] = ["ant-fwd"]
    learning.main()
