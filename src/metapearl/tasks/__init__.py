"""Task families. Built-in ones are registered on import; users add theirs with register_family.

The MuJoCo families are registered even without MuJoCo installed (``metapearl tasks`` lists them);
making one of their envs then raises MissingExtraError naming the install command.
"""

from metapearl.tasks.base import Task, TaskFamily, family_names, get_family, register_family
from metapearl.tasks.locomotion import AntDir, AntGoal, CheetahDir, CheetahVel, HumanoidDir
from metapearl.tasks.mujoco import MissingExtraError
from metapearl.tasks.point import PointEnv, PointRobot, SparsePointRobot
from metapearl.tasks.rand_params import HopperRandParams, WalkerRandParams

for _family in (PointRobot, SparsePointRobot, CheetahVel, CheetahDir, AntDir, AntGoal, HumanoidDir,
                WalkerRandParams, HopperRandParams):
    register_family(_family)

__all__ = [
    "MissingExtraError", "PointEnv", "PointRobot", "SparsePointRobot", "Task", "TaskFamily",
    "family_names", "get_family", "register_family",
]
