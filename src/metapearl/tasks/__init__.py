"""Task families. Built-in ones are registered on import; users add theirs with register_family."""

from metapearl.tasks.base import Task, TaskFamily, family_names, get_family, register_family
from metapearl.tasks.point import PointEnv, PointRobot, SparsePointRobot

register_family(PointRobot)
register_family(SparsePointRobot)

__all__ = [
    "PointEnv", "PointRobot", "SparsePointRobot", "Task", "TaskFamily", "family_names",
    "get_family", "register_family",
]
