import os

import pytest

# the tests run headless: MuJoCo must pick its offscreen GL before any test imports it
os.environ.setdefault("MUJOCO_GL", "egl")

from metapearl.config import make_config

TINY = dict(
    num_train_tasks=6, num_test_tasks=3, net_size=16, encoder_size=16, latent_size=3,
    meta_batch=4, batch_size=8, embedding_batch_size=8, num_iterations=2, num_initial_steps=20,
    num_tasks_sample=2, num_steps_prior=20, num_steps_posterior=20,
    num_extra_rl_steps_posterior=20, num_train_steps_per_itr=3, num_steps_per_eval=40,
    num_evals=1, max_path_length=10,
    # the paper's diagonal factors and independent context transitions (point-robot's default
    # preset has rank-1 factors with bounded u and context_trajectories)
    factor_rank=0, factor_u_bound=0.0, posterior_mean_bound=0.0, context_trajectories=False,
)


@pytest.fixture
def tiny_config():
    """A config small enough for a whole run to take about a second."""

    def make(family="point-robot", **overrides):
        return make_config(family, "default", {**TINY, **overrides})

    return make


def trained_params(trainer):
    """Copies of every parameter the trainer's optimizer steps, to compare before and after."""
    return [p.detach().clone() for p in trainer.update.optimizer.param_groups[0]["params"]]
