"""Per-task replay storage as one preallocated tensor, and the context samplers (SPEC section 4).

All tasks share one (tasks, capacity, width) float32 tensor, so the RL batch (or the context batch)
of every meta-batch task is drawn with one random draw and one indexing op. Capacity starts small
and doubles on demand up to `max_size` rows per task (FIFO beyond), so memory follows the data a
run actually collects. Each task also marks where its trajectories start, for the recurrent
ablation's batches of whole trajectories (`sample(..., sequence=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """Transitions of several tasks; every field is (tasks, n, dim)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor  # the critic's reward (dense)
    context_rewards: torch.Tensor  # the reward the encoder sees (sparse for sparse families)
    next_obs: torch.Tensor
    terminals: torch.Tensor


class TaskReplayBuffer:
    """Transitions of each task, stored per task and sampled uniformly with replacement."""

    def __init__(
        self,
        num_tasks: int,
        obs_dim: int,
        action_dim: int,
        max_size: int,
        device: torch.device | str = "cpu",
        initial_capacity: int = 256,
    ):
        self.obs_dim, self.action_dim, self.max_size = obs_dim, action_dim, max_size
        self.width = 2 * obs_dim + action_dim + 3
        self.device = torch.device(device)
        self.data = torch.zeros(num_tasks, min(initial_capacity, max_size), self.width,
                                device=self.device)
        self.sizes = np.zeros(num_tasks, dtype=np.int64)
        self.tops = np.zeros(num_tasks, dtype=np.int64)  # next write position (FIFO)
        self._sizes_t = torch.zeros(num_tasks, dtype=torch.float32, device=self.device)
        self.starts = np.zeros((num_tasks, self.capacity), dtype=bool)  # first row of a trajectory

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    def rows(self, obs, actions, rewards, context_rewards, next_obs, terminals) -> np.ndarray:
        """Pack n transitions (numpy arrays with n leading rows) into storage rows (n, width)."""
        return np.concatenate(
            [obs, actions, rewards[:, None], context_rewards[:, None], next_obs,
             terminals[:, None]], axis=1, dtype=np.float32,
        )

    def add(self, task: int, rows: np.ndarray) -> None:
        """Append one trajectory's rows (n, width) to `task`, overwriting its oldest rows beyond
        max_size. An empty trajectory (an env that flagged its first step unstable) adds nothing."""
        n = len(rows)
        if n == 0:
            return
        needed = min(self.sizes[task] + n, self.max_size)
        if needed > self.capacity:
            self._grow(needed)
        rows_t = torch.as_tensor(rows[-self.max_size:], device=self.device)
        start = int(self.tops[task])
        first = min(len(rows_t), self.max_size - start)
        self.data[task, start:start + first] = rows_t[:first]
        self.data[task, :len(rows_t) - first] = rows_t[first:]
        self.starts[task, start:start + first] = False
        self.starts[task, :len(rows_t) - first] = False
        if len(rows_t) == n:  # a trajectory longer than the buffer keeps only its tail
            self.starts[task, start] = True
        self.tops[task] = (start + len(rows_t)) % self.max_size
        self.sizes[task] = needed
        self._sizes_t[task] = float(needed)

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_size)
        grown = torch.zeros(self.data.shape[0], cap, self.width, device=self.device)
        grown[:, :self.capacity] = self.data
        self.data = grown
        self.starts = np.pad(self.starts, ((0, 0), (0, cap - self.starts.shape[1])))

    def clear(self, task: int) -> None:
        self.sizes[task] = 0
        self.tops[task] = 0
        self._sizes_t[task] = 0.0
        self.starts[task] = False

    def sample(self, tasks: torch.Tensor, n: int, generator: torch.Generator | None,
               sequence: bool = False) -> Batch:
        """n transitions per task: tasks (B,) -> Batch of (B, n, dim).

        Uniform with replacement; with `sequence`, n consecutive rows from the start of a random
        trajectory (whole trajectories in the order they were collected, the last one cut at n).
        """
        sizes = self._sizes_t[tasks]
        # (the host's counts first: no read from the device unless some buffer is empty; a CUDA
        # graph's capture may not read values back, graphs.py calls check_filled)
        if (self.sizes == 0).any() and not _capturing(self.device) and bool((sizes == 0).any()):
            _refuse_empty(tasks[sizes == 0].tolist())
        if sequence:
            idx = self._sequence_index(tasks.tolist(), n, generator)
        else:
            u = torch.rand(len(tasks), n, generator=generator, device=self.device)
            idx = (u * sizes[:, None]).long()
        return self.split(self.data[tasks[:, None], idx])

    def _sequence_index(self, tasks: list[int], n: int, generator: torch.Generator | None):
        """Row indices (B, n): for each task, n rows in collection order from a trajectory start
        chosen uniformly among those with n rows after them."""
        u = torch.rand(len(tasks), generator=generator, device=self.device).tolist()
        first = np.empty(len(tasks), dtype=np.int64)
        oldest = np.empty(len(tasks), dtype=np.int64)
        for i, t in enumerate(tasks):
            size = int(self.sizes[t])
            oldest[i] = self.tops[t] if size == self.max_size else 0
            age = (np.flatnonzero(self.starts[t, :size]) - oldest[i]) % size  # 0 = oldest row
            fits = np.sort(age[age <= size - n])
            # no start with n rows after it: the newest n rows (all rows, repeated, if fewer)
            first[i] = fits[int(u[i] * len(fits))] if len(fits) else max(size - n, 0)
        sizes = self.sizes[tasks]
        idx = (oldest[:, None] + (first[:, None] + np.arange(n)) % sizes[:, None]) % sizes[:, None]
        return torch.as_tensor(idx, device=self.device)

    def check_filled(self) -> None:
        """Raise the error `sample` raises if any task's buffer is empty, from the host's sizes
        (for callers that cannot read the device, as a CUDA graph's replay cannot)."""
        empty = (self.sizes == 0).nonzero()[0]
        if len(empty):
            _refuse_empty(empty.tolist())

    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors `sample` reads (the rows and the per-task sizes); a new tensor replaces
        one only when the buffer grows or is loaded."""
        return self.data, self._sizes_t

    def all_of(self, task: int) -> Batch:
        """Every stored transition of one task, as a Batch of (1, size, dim)."""
        return self.split(self.data[task:task + 1, :int(self.sizes[task])])

    def split(self, x: torch.Tensor) -> Batch:
        o, a = self.obs_dim, self.action_dim
        return Batch(
            obs=x[..., :o], actions=x[..., o:o + a], rewards=x[..., o + a:o + a + 1],
            context_rewards=x[..., o + a + 1:o + a + 2], next_obs=x[..., o + a + 2:2 * o + a + 2],
            terminals=x[..., 2 * o + a + 2:],
        )

    def state_dict(self) -> dict:
        used = int(self.sizes.max()) if len(self.sizes) else 0
        return {"data": self.data[:, :used].to("cpu", copy=True),  # (a compact copy)
                "sizes": torch.as_tensor(self.sizes),
                "tops": torch.as_tensor(self.tops),
                "starts": torch.as_tensor(self.starts[:, :used].copy())}

    def load_state_dict(self, state: dict) -> None:
        data = state["data"].to(self.device)
        tasks = self.data.shape[0]
        if data.dim() != 3 or data.shape[0] != tasks or data.shape[2] != self.width:
            raise ValueError(f"stored rows of shape {tuple(data.shape)}, expected ({tasks}, n, "
                             f"{self.width})")
        self.data = torch.zeros(data.shape[0], max(data.shape[1], 1), self.width,
                                device=self.device)
        self.data[:, :data.shape[1]] = data
        self.sizes = state["sizes"].numpy().astype(np.int64).copy()
        self.tops = state["tops"].numpy().astype(np.int64).copy()
        self._sizes_t = torch.as_tensor(self.sizes, dtype=torch.float32, device=self.device)
        self.starts = np.zeros((tasks, self.capacity), dtype=bool)
        if "starts" in state:  # checkpoints of format 2 did not mark trajectory starts
            self.starts[:, :data.shape[1]] = state["starts"].numpy()


def _refuse_empty(tasks: list[int]) -> None:
    raise RuntimeError(f"cannot sample from empty buffers of tasks {tasks}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def sample_context(
    sampler: str,
    rl_buffer: TaskReplayBuffer,
    enc_buffer: TaskReplayBuffer,
    tasks: torch.Tensor,
    n: int,
    generator: torch.Generator | None,
    rl_batch: Batch | None = None,
    sequence: bool = False,
) -> Batch:
    """The context batch S_c (SPEC section 4) for `tasks`: (B, n, dim) transitions.

    recent: from the encoder buffer (data of the latest collection, the paper's choice);
    off-policy: a separate draw from the whole RL buffer;
    off-policy-rl-batch: the RL batch itself.
    With `sequence` (the rnn-traj encoder), whole trajectories in collection order.
    """
    if sampler == "recent":
        return enc_buffer.sample(tasks, n, generator, sequence)
    if sampler == "off-policy":
        return rl_buffer.sample(tasks, n, generator, sequence)
    if sampler == "off-policy-rl-batch":
        if rl_batch is None:
            raise ValueError("off-policy-rl-batch needs the RL batch")
        return rl_batch
    raise ValueError(f"unknown context sampler {sampler!r}")
