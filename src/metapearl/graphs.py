"""CUDA graphs for the gradient steps (`cuda_graphs = true`): capture one step, replay it.

On a GPU the paper-size step is a few hundred small kernels, so its cost is expected to be the CPU
launching them rather than the GPU running them (not measured yet: no GPU was available). A CUDA
graph launches the whole recorded step at once. One step is captured as two graphs:
- `backward`: draw the meta-batch tasks, sample the RL and context batches from the buffers,
  the losses, the gradients and the stats (no parameter changes);
- `apply`: Adam on every network and the target-V Polyak update.
Between the two the host reads the stats back and raises NonFiniteError before a NaN reaches the
parameters, as the eager step does (`PEARLUpdate.step`).

The graphs read the buffers' tensors at fixed addresses and draw from the run's generator (it is
registered with the graph, so every replay draws new numbers from it). A buffer that grows gets a
new tensor: the step is captured again before the next replay. Before each capture a few steps run
eagerly on a side stream, as CUDA graphs need (lazy initialisations must happen outside the
capture); they are real steps of the run, counted and averaged like the replays.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from metapearl.buffers import Batch, TaskReplayBuffer
from metapearl.config import ConfigError
from metapearl.guards import check_finite
from metapearl.sac import STAT_NAMES, PEARLUpdate

WARMUP_STEPS = 3


class GraphedSteps:
    """Gradient steps replayed from CUDA graphs; `run(n)` takes n steps and returns their summed
    stats, like n calls of `update.step(*sample(), generator)` (whose generator is on the GPU)."""

    def __init__(self, update: PEARLUpdate, sample: Callable[[], tuple[Batch, Batch]],
                 buffers: Sequence[TaskReplayBuffer], generator: torch.Generator):
        if torch.__version__ < (2, 4):  # (2.3 captures draws from the default generator only)
            raise ConfigError(f"cuda_graphs needs torch >= 2.4, whose CUDA graphs can draw from "
                               f"a run's own generator; this is torch {torch.__version__}")
        self.update, self.sample, self.buffers, self.gen = update, sample, buffers, generator
        self._key: tuple | None = None  # the buffer tensors (address, shape) the graphs read
        self._warm = 0  # eager steps taken since those tensors changed
        self._backward = self._apply = None  # the captured graphs
        self._stats = torch.zeros(len(STAT_NAMES), device=generator.device)  # backward's output
        self.captures = 0  # captures so far (a buffer's growth adds one)

    def run(self, n: int) -> torch.Tensor:
        """Take n gradient steps: eager warm-up steps after a buffer's tensors changed, then
        replays; returns the sum of their stats. Raises NonFiniteError before a step with NaN or
        infinite losses or gradients changes a parameter."""
        with _on_device(self.gen.device):
            return self._run(n)

    def _run(self, n: int) -> torch.Tensor:
        for buf in self.buffers:  # the replays cannot check this themselves
            buf.check_filled()
        key = tuple((t.data_ptr(), *t.shape) for buf in self.buffers for t in buf.storage())
        if key != self._key:
            self._key, self._warm = key, 0
            self._backward = self._apply = None  # free the old graphs' memory
        total = torch.zeros(len(STAT_NAMES), device=self.gen.device)
        if self._backward is None:
            eager = min(WARMUP_STEPS - self._warm, n)
            with _side_stream(self.gen.device):
                for _ in range(eager):
                    total += self.update.step(*self.sample(), self.gen)
            self._warm, n = self._warm + eager, n - eager
            if self._warm < WARMUP_STEPS or n == 0:  # (a capture may not outlive collection)
                return total
            self._capture()
        for _ in range(n):
            self._backward.replay()
            check_finite(self._stats, STAT_NAMES, "the gradient step")
            self._apply.replay()
            total += self._stats
        return total

    def _capture(self) -> None:
        def backward():
            self._stats.copy_(self.update.backward(*self.sample(), self.gen))

        # the gradients are then allocated inside the graph's memory, at fixed addresses
        self.update.optimizer.zero_grad(set_to_none=True)
        # no garbage collection during the capture: freeing another (unreachable) graph then
        # fails in some torch versions ("operation not permitted when stream is capturing")
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            graph = _capture_graph(backward, generator=self.gen)
            self._apply = _capture_graph(self.update.apply, pool=graph.pool())
            self._backward = graph  # set last: a failed capture leaves none
        finally:
            if was_enabled:
                gc.enable()
        self.captures += 1


# --- the CUDA calls (tests/test_graphs.py stands in for them on CPU) ----------------------------
def _capture_graph(fn: Callable[[], None], generator: torch.Generator | None = None,
                   pool=None) -> torch.cuda.CUDAGraph:
    """Record fn's kernels as a graph; its random draws come from `generator` on each replay."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


@contextmanager
def _side_stream(device: torch.device):
    """Run the block on a fresh stream (the warm-up before a capture), joined with the current one
    on both ends."""
    side, current = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


def _on_device(device: torch.device):
    """Capture and replay on the generator's GPU."""
    return torch.cuda.device(device)
