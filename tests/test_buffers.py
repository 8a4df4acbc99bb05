import numpy as np
import pytest
import torch

from metapearl.buffers import TaskReplayBuffer, sample_context
from metapearl.trainer import Trainer, task_waves


def _rows(buf, task, n, start=0):
    """Rows whose obs[0] encodes (task, index) so samples can be traced back."""
    obs = np.stack([np.full(n, task * 1000.0), np.arange(start, start + n)], axis=1)
    return buf.rows(obs, np.zeros((n, 1)), np.arange(n, dtype=float), np.zeros(n), obs,
                    np.zeros(n))


def test_sampling_returns_only_each_tasks_own_rows():
    buf = TaskReplayBuffer(3, 2, 1, max_size=100, initial_capacity=4)
    for t in range(3):
        buf.add(t, _rows(buf, t, 10 + t))
    tasks = torch.tensor([2, 0, 2, 1])
    batch = buf.sample(tasks, 50, torch.Generator().manual_seed(0))
    assert batch.obs.shape == (4, 50, 2) and batch.rewards.shape == (4, 50, 1)
    for i, t in enumerate(tasks.tolist()):
        assert torch.all(batch.obs[i, :, 0] == t * 1000)
        assert batch.obs[i, :, 1].max() < 10 + t
    assert buf.capacity >= 12  # grew on demand from 4


def test_fifo_keeps_the_newest_rows():
    buf = TaskReplayBuffer(1, 2, 1, max_size=8, initial_capacity=2)
    buf.add(0, _rows(buf, 0, 6))
    buf.add(0, _rows(buf, 0, 5, start=6))  # 11 rows into 8 slots: rows 3..10 survive
    assert buf.sizes[0] == 8
    kept = sorted(buf.all_of(0).obs[0, :, 1].tolist())
    assert kept == list(range(3, 11))


def test_clear_empties_one_task_only_and_empty_sampling_is_an_error():
    buf = TaskReplayBuffer(2, 2, 1, max_size=50)
    buf.add(0, _rows(buf, 0, 5))
    buf.add(1, _rows(buf, 1, 5))
    buf.clear(0)
    assert buf.sizes.tolist() == [0, 5]
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(torch.tensor([0, 1]), 3, None)


def test_context_samplers_draw_from_their_sources():
    rl = TaskReplayBuffer(1, 2, 1, max_size=50)
    enc = TaskReplayBuffer(1, 2, 1, max_size=50)
    rl.add(0, _rows(rl, 0, 20))
    enc.add(0, _rows(enc, 0, 3, start=100))
    tasks, g = torch.tensor([0]), torch.Generator().manual_seed(0)
    assert sample_context("recent", rl, enc, tasks, 30, g).obs[..., 1].min() >= 100
    assert sample_context("off-policy", rl, enc, tasks, 30, g).obs[..., 1].max() < 20
    batch = rl.sample(tasks, 7, g)
    assert sample_context("off-policy-rl-batch", rl, enc, tasks, 30, g, batch) is batch


def test_task_waves_keep_repeats_apart_and_order():
    assert task_waves([3, 1, 3, 2, 3]) == [[3, 1, 2], [3], [3]]


def test_encoder_buffer_holds_only_the_latest_collection_and_no_extra_rl_steps(tiny_config,
                                                                                tmp_path):
    cfg = tiny_config(num_steps_prior=20, num_steps_posterior=10, num_extra_rl_steps_posterior=30,
                      num_initial_steps=20, max_path_length=10, num_tasks_sample=3)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.collect_iteration_data()  # iteration 0: initial steps, then the drawn tasks
    rl0, enc0 = tr.rl_buffer.sizes.copy(), tr.enc_buffer.sizes.copy()
    tr.iteration = 1
    draw_rng = np.random.default_rng()
    draw_rng.bit_generator.state = tr.rng.bit_generator.state
    drawn = set(draw_rng.integers(cfg.num_train_tasks, size=cfg.num_tasks_sample).tolist())
    tr.collect_iteration_data()
    for t in range(cfg.num_train_tasks):
        if t in drawn:
            # encoder buffer: cleared, then prior (20) + posterior (10) steps; extra-RL kept out
            assert tr.enc_buffer.sizes[t] == 30
            assert tr.rl_buffer.sizes[t] - rl0[t] >= 60
        else:
            assert tr.enc_buffer.sizes[t] == enc0[t] and tr.rl_buffer.sizes[t] == rl0[t]
