"""The CUDA paths: training on a GPU, and the gradient steps replayed from CUDA graphs (graphs.py).

Skipped without a CUDA GPU (CI has none); `scripts/device_check.sh` runs them on one.
"""

import math

import pytest
import torch
from conftest import trained_params

from metapearl import Trainer, train
from metapearl.guards import NonFiniteError
from metapearl.logging import read_progress

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _trainers(tiny_config, tmp_path, **overrides):
    """Two trainers of the same seeded run on CUDA, the second with CUDA graphs, after their
    initial collection (the same data: rollouts and envs are seeded alike)."""
    trainers = []
    for graphs in (False, True):
        cfg = tiny_config(device="cuda", cuda_graphs=graphs, **overrides)
        trainer = Trainer(cfg, tmp_path / f"graphs-{graphs}", progress=False)
        trainer.collect_iteration_data()
        trainers.append(trainer)
    eager, graphed = trainers
    torch.testing.assert_close(eager.rl_buffer.data, graphed.rl_buffer.data)
    return eager, graphed


def _assert_same_state(a, b):
    for x, y in zip(trained_params(a), trained_params(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.gen.get_state(), b.gen.get_state())


@cuda
def test_graph_replays_take_the_eager_steps(tiny_config, tmp_path):
    eager, graphed = _trainers(tiny_config, tmp_path, num_train_steps_per_itr=10)
    stats_e, stats_g = eager.train_steps_for_iteration(), graphed.train_steps_for_iteration()
    assert graphed.graphed.captures == 1  # 3 eager warm-up steps, then 7 replays
    torch.testing.assert_close(stats_e, stats_g, rtol=1e-4, atol=1e-5)
    _assert_same_state(eager, graphed)
    before = trained_params(graphed)
    stats_e, stats_g = eager.train_steps_for_iteration(), graphed.train_steps_for_iteration()
    assert graphed.graphed.captures == 1  # replays only
    torch.testing.assert_close(stats_e, stats_g, rtol=1e-4, atol=1e-5)
    _assert_same_state(eager, graphed)
    assert not all(torch.equal(a, b) for a, b in zip(before, trained_params(graphed), strict=True))


@cuda
def test_a_grown_buffer_is_captured_again(tiny_config, tmp_path):
    eager, graphed = _trainers(tiny_config, tmp_path, num_train_steps_per_itr=5)
    for trainer in (eager, graphed):
        trainer.train_steps_for_iteration()
        trainer.rl_buffer._grow(4 * trainer.rl_buffer.capacity)  # new storage, same rows
    for trainer in (eager, graphed):
        trainer.train_steps_for_iteration()
    assert graphed.graphed.captures == 2
    _assert_same_state(eager, graphed)


@cuda
def test_a_nan_in_a_replayed_step_stops_before_the_parameters_change(tiny_config, tmp_path):
    _, graphed = _trainers(tiny_config, tmp_path, num_train_steps_per_itr=5)
    graphed.train_steps_for_iteration()  # captured
    graphed.rl_buffer.data[..., : graphed.rl_buffer.obs_dim].fill_(float("nan"))  # in place
    before = trained_params(graphed)
    with pytest.raises(NonFiniteError, match="non-finite Loss/qf=nan"):
        graphed.train_steps_for_iteration()
    assert all(torch.equal(a, b) for a, b in zip(before, trained_params(graphed), strict=True))


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_a_run_on_cuda_trains_and_evaluates(tiny_config, tmp_path, graphs):
    summary = train(tiny_config(device="cuda", cuda_graphs=graphs), tmp_path / "run",
                    progress=False)
    rows = read_progress(tmp_path / "run" / "progress.csv")
    assert len(rows) == 2 and summary.iterations == 2
    assert all(math.isfinite(float(r["Loss/qf"])) for r in rows)


@cuda
def test_a_resume_may_switch_cuda_graphs_on(tiny_config, tmp_path):
    steps = {"device": "cuda", "num_train_steps_per_itr": 5}  # 3 warm-up steps, then 2 replays
    train(tiny_config(num_iterations=1, **steps), tmp_path / "run", progress=False)
    trainer = Trainer(tiny_config(cuda_graphs=True, **steps), tmp_path / "run", resume=True,
                      progress=False)
    assert all(g["capturable"] for g in trainer.update.optimizer.param_groups)
    trainer.train()
    assert trainer.graphed.captures == 1 and trainer.iteration == 2
