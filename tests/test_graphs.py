"""GraphedSteps' bookkeeping (graphs.py) on CPU: warm-up, capture, replay, recapture, NaN check.

A CPU has no CUDA graphs, so the three CUDA calls of graphs.py are replaced by stand-ins: a
"captured graph" replays the captured function, the warm-up stream and the device switch do
nothing. What CUDA itself does is tested on a GPU by tests/test_cuda.py.
"""

import contextlib

import pytest
import torch
from conftest import trained_params
from torch.torch_version import TorchVersion

from metapearl import Trainer, graphs
from metapearl.config import ConfigError
from metapearl.guards import NonFiniteError


class _Replayer:
    """Stands in for a CUDA graph: capturing runs nothing, each replay runs the function."""

    captured: list = []  # the generator each capture was given

    def __init__(self, fn, generator=None, pool=None):
        self.fn = fn
        self.captured.append(generator)

    def replay(self):
        self.fn()

    def pool(self):
        return None


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    monkeypatch.setattr(_Replayer, "captured", [])
    monkeypatch.setattr(graphs, "_capture_graph", _Replayer)
    monkeypatch.setattr(graphs, "_side_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "_on_device", lambda device: contextlib.nullcontext())


def _pair(tiny_config, tmp_path, steps):
    """The same seeded run twice after its initial collection; the second takes graphed steps."""
    cfg = tiny_config(num_train_steps_per_itr=steps)
    eager, graphed = (Trainer(cfg, tmp_path / name, progress=False) for name in ("a", "b"))
    for trainer in (eager, graphed):
        trainer.collect_iteration_data()
    graphed.graphed = graphs.GraphedSteps(graphed.update, graphed.sample_batches,
                                          [graphed.rl_buffer, graphed.enc_buffer], graphed.gen)
    return eager, graphed


def _assert_same(a, b):
    for x, y in zip(trained_params(a), trained_params(b), strict=True):
        torch.testing.assert_close(x, y)
    assert torch.equal(a.gen.get_state(), b.gen.get_state())


def test_warm_up_then_capture_then_replays_take_the_eager_steps(tiny_config, tmp_path,
                                                                cuda_stand_ins):
    eager, graphed = _pair(tiny_config, tmp_path, steps=2)
    captures = []
    for _ in range(3):  # 2 + 1 warm-up steps, then the capture and 1 replay, then 2 replays
        torch.testing.assert_close(graphed.train_steps_for_iteration(),
                                   eager.train_steps_for_iteration())
        captures.append(graphed.graphed.captures)
        _assert_same(eager, graphed)
    assert captures == [0, 1, 1]
    assert _Replayer.captured == [graphed.gen, None]  # the backward graph draws from the run's


def test_a_buffer_that_grows_is_captured_again_after_a_new_warm_up(tiny_config, tmp_path,
                                                                   cuda_stand_ins, monkeypatch):
    eager, graphed = _pair(tiny_config, tmp_path, steps=5)
    for trainer in (eager, graphed):
        trainer.train_steps_for_iteration()
        trainer.enc_buffer._grow(2 * trainer.enc_buffer.capacity)  # new storage, same rows
    assert graphed.graphed.captures == 1
    eager_steps = []
    step = graphed.update.step
    monkeypatch.setattr(graphed.update, "step", lambda *a: eager_steps.append(1) or step(*a))
    torch.testing.assert_close(graphed.train_steps_for_iteration(),
                               eager.train_steps_for_iteration())
    assert graphed.graphed.captures == 2 and len(eager_steps) == graphs.WARMUP_STEPS
    _assert_same(eager, graphed)


def test_a_nan_in_a_replayed_step_stops_before_the_parameters_change(tiny_config, tmp_path,
                                                                     cuda_stand_ins):
    _, graphed = _pair(tiny_config, tmp_path, steps=5)
    graphed.train_steps_for_iteration()  # warm-up and capture
    graphed.rl_buffer.data[..., : graphed.rl_buffer.obs_dim].fill_(float("nan"))
    before = trained_params(graphed)
    with pytest.raises(NonFiniteError, match="non-finite Loss/qf=nan"):
        graphed.train_steps_for_iteration()
    assert all(torch.equal(a, b) for a, b in zip(before, trained_params(graphed), strict=True))


def test_an_empty_buffer_is_refused_before_any_replay(tiny_config, tmp_path, cuda_stand_ins):
    _, graphed = _pair(tiny_config, tmp_path, steps=5)
    graphed.train_steps_for_iteration()
    graphed.enc_buffer.clear(2)
    state = graphed.gen.get_state()
    with pytest.raises(RuntimeError, match=r"cannot sample from empty buffers of tasks \[2\]"):
        graphed.train_steps_for_iteration()
    assert torch.equal(graphed.gen.get_state(), state)  # refused before drawing a batch


def test_a_torch_whose_graphs_cannot_draw_from_the_runs_generator_is_refused(
        tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.3.1+cu121"))
    with pytest.raises(ConfigError, match="cuda_graphs needs torch >= 2.4"):
        graphs.GraphedSteps(trainer.update, trainer.sample_batches, [trainer.rl_buffer],
                            trainer.gen)
