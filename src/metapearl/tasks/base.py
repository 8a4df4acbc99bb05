"""The task-family protocol and the registry of families.

A *task family* is a distribution of MDPs over one Gymnasium environment. It makes environments,
draws a seeded set of tasks (plain JSON-able dicts) and sets a task on an environment. That is all
PEARL needs from it (the trainer, the meta-test, the command line and the pictures use only
these).

Reward conventions read by the rollout:
- ``reward`` returned by ``env.step`` trains the critic;
- ``info["sparse_reward"]``, when present, is the reward seen by the context encoder and by the
  meta-test return (SPEC section 4, sparse-reward tasks); otherwise the reward itself is;
- ``info["success"]`` (bool), when present, feeds the success-rate columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

Task = dict[str, Any]


class TaskFamily(ABC):
    """A distribution of tasks over one Gymnasium environment.

    Subclasses set ``name``, ``max_path_length`` and ``task_parameter`` (a short description for
    ``metapearl tasks``) and implement ``make_env``, ``sample_task`` and ``set_task``. Families whose
    task sets are not i.i.d. draws (fixed lists, evenly spaced goals) override ``sample_tasks``.
    """

    name: str = ""
    max_path_length: int = 200
    task_parameter: str = ""
    reports_success: bool = False  # its env sets info["success"]: log success-rate columns

    @abstractmethod
    def make_env(self) -> gym.Env:
        """A fresh environment; its action space is a bounded Box (actions are rescaled to it)."""

    @abstractmethod
    def sample_task(self, rng: np.random.Generator) -> Task:
        """One task drawn from the family's distribution, as plain JSON-able data."""

    @abstractmethod
    def set_task(self, env: gym.Env, task: Task) -> None:
        """Make `env` follow `task` from its next reset on, undoing any earlier task entirely."""

    def sample_tasks(
        self, num_train: int, num_test: int, rng: np.random.Generator
    ) -> tuple[list[Task], list[Task]]:
        """Training and test task sets, independent draws from `rng` (the run's generator):
        disjoint almost surely for a continuous task distribution."""
        tasks = [self.sample_task(rng) for _ in range(num_train + num_test)]
        return tasks[:num_train], tasks[num_train:]


def plain_tasks(family: TaskFamily, tasks: list, expected: int, which: str) -> list[Task]:
    """A family's task set as plain data, the form a checkpoint stores and a resumed or loaded run
    gets back: numpy scalars and arrays become numbers and lists (so training and every later use
    see the same values). ConfigError for a set of the wrong size or a value of another kind."""
    from metapearl.config import ConfigError

    def plain(value: Any, where: str) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else items
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        raise ConfigError(f"{family.name}: {where} is a {type(value).__name__}; tasks hold plain "
                          "data (numbers, strings, lists and dicts of them)")

    if len(tasks) != expected:
        raise ConfigError(f"{family.name}: sample_tasks gave {len(tasks)} {which} tasks, "
                          f"{expected} were asked for")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise ConfigError(f"{family.name}: {which} task {i} is a {type(task).__name__}; a "
                              "task is a dict of named values")
    return [plain(task, f"{which} task {i}") for i, task in enumerate(tasks)]


_REGISTRY: dict[str, Callable[[], TaskFamily]] = {}


def register_family(family: TaskFamily | Callable[[], TaskFamily], name: str | None = None) -> None:
    """Register a family (an instance or a zero-argument factory) under its name."""
    if isinstance(family, TaskFamily):
        instance = family
        factory: Callable[[], TaskFamily] = lambda: instance  # noqa: E731
        key = name or family.name
    else:
        factory = family
        key = name or family().name
    if not key:
        raise ValueError("a task family needs a non-empty name")
    _REGISTRY[key] = factory


def family_names() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> TaskFamily:
    """The registered family `name`; ValueError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(family_names())}")
    return _REGISTRY[name]()
