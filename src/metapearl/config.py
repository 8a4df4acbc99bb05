"""Run configuration: one dataclass whose fields are SPEC's names, presets, and validation.

The dataclass defaults are SPEC section 7's "Defaults" row; a preset overrides some fields for one
task family. Every field carries a one-line help text (``metapearl config FAMILY`` prints them).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from metapearl.cpu import CPU_GEMMS


class ConfigError(ValueError):
    """A configuration value a user supplied is unknown, malformed or out of range."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class PEARLConfig:
    """Every hyperparameter of a PEARL run (SPEC sections 2-5, 7)."""

    family: str = _f("point-robot", "task family name (see `metapearl tasks`)")
    preset: str = _f("default", "name of the preset this config started from (informational)")
    seed: int = _f(0, "seed of the run's numpy and torch generators (task sets, data, init)")
    device: str = _f("cpu", "torch device: cpu, cuda, cuda:1, ...")
    # tasks
    num_train_tasks: int = _f(100, "number of meta-training tasks")
    num_test_tasks: int = _f(30, "number of held-out meta-test tasks")
    max_path_length: int = _f(200, "maximum steps of one trajectory")
    # model (SPEC section 2)
    latent_size: int = _f(5, "dimension of the context variable z")
    net_size: int = _f(300, "hidden width of the Q, V and policy networks (3 hidden layers)")
    encoder_size: int = _f(
        200, "hidden width of the context encoder (pog: 3 hidden layers; rnn-*: 2 layers per "
        "transition, then a GRU of this width)"
    )
    use_information_bottleneck: bool = _f(
        True, "stochastic z with KL to N(0,I); False: deterministic z (pog: the mean of the encoder "
        "outputs; rnn-*: the GRU head's output), no KL term"
    )
    use_next_obs_in_context: bool = _f(False, "context transitions include s' as well as (s,a,r)")
    encoder: str = _f(
        "pog", "context encoder: pog (product of Gaussians, the paper's), rnn-tran (GRU over "
        "independent transitions), rnn-traj (GRU over whole trajectories; RL batch too)"
    )
    rnn_bptt_steps: int = _f(
        100, "recurrent encoders: backpropagate through at most this many context rows (0: all, "
        "as the reference does; the default 100 bounds the cost on long contexts)"
    )
    factor_rank: int = _f(
        0, "pog encoder: rank of a low-rank term added to each factor's diagonal precision, so a "
        "transition can say 'z lies near a tilted plane' (0: diagonal factors, the paper's)"
    )
    factor_u_bound: float = _f(
        0.0, "factor_rank > 0: squash each element of the low-rank term u to (-b, b) by "
        "b tanh(u / b), so nearly parallel factors cannot put the posterior mean far away "
        "(0: unbounded)"
    )
    posterior_mean_bound: float = _f(
        0.0, "pog encoder: squash each element of the posterior mean to (-b, b) by "
        "b tanh(mu / b), so a product of low-rank factors that extrapolates cannot hand the "
        "critic a z far outside the range it was trained on (0: unbounded)"
    )
    # losses (SPEC section 3)
    meta_batch: int = _f(16, "training tasks per gradient step")
    batch_size: int = _f(256, "RL batch: transitions per task per gradient step")
    embedding_batch_size: int = _f(
        64, "context batch: transitions per task per gradient step (unused by off-policy-rl-batch, "
        "which takes the RL batch); also the buffer rows behind each training-collection posterior "
        "and the offline evaluation's, and the rows sample_online_context draws"
    )
    discount: float = _f(0.99, "gamma")
    soft_target_tau: float = _f(0.005, "Polyak rate of the target V network")
    reward_scale: float = _f(5.0, "reward multiplier in the critic target (acts as 1/alpha)")
    kl_lambda: float = _f(0.1, "weight of the KL(q(z|c) || N(0,I)) term")
    kl_lambda_schedule: str = _f(
        "", "later KL weights, as ITERATION:WEIGHT pairs separated by commas (e.g. 300:0.1): "
        "from that meta-training iteration on the weight is WEIGHT instead of kl_lambda "
        "(empty: kl_lambda throughout)"
    )
    lr: float = _f(3e-4, "Adam learning rate of every network")
    policy_mean_reg_weight: float = _f(1e-3, "weight of mean(mu^2) in the policy loss")
    policy_std_reg_weight: float = _f(1e-3, "weight of mean(log_std^2) in the policy loss")
    # data schedule (SPEC section 4)
    num_iterations: int = _f(500, "meta-training iterations")
    num_initial_steps: int = _f(2000, "iteration 0: steps collected per training task under the prior")
    num_tasks_sample: int = _f(5, "training tasks drawn for collection per iteration")
    num_steps_prior: int = _f(400, "steps per drawn task with z ~ prior (both buffers)")
    num_steps_posterior: int = _f(0, "steps per drawn task with z ~ posterior (both buffers)")
    num_extra_rl_steps_posterior: int = _f(
        600, "steps per drawn task with z ~ posterior, RL buffer only"
    )
    update_post_train: int = _f(1, "re-infer the collection posterior every this many trajectories")
    num_train_steps_per_itr: int = _f(2000, "gradient steps per iteration")
    context_sampler: str = _f(
        "recent", "context source: recent (encoder buffer), off-policy, off-policy-rl-batch"
    )
    context_trajectories: bool = _f(
        False, "each gradient step's context batch as whole trajectories in collection order, "
        "the shape of the meta-test's context, instead of independent transitions (ours; "
        "point-robot's default preset)"
    )
    replay_buffer_size: int = _f(1_000_000, "maximum transitions kept per task (FIFO beyond)")
    # meta-test (SPEC section 5)
    num_steps_per_eval: int = _f(600, "evaluation steps per task and run (whole trajectories)")
    num_evals: int = _f(2, "evaluation runs per task")
    num_exp_traj_eval: int = _f(1, "trajectories under the prior before the first posterior update")
    num_eval_train_tasks: int = _f(
        -1, "training tasks evaluated at each evaluation (-1: as many as test tasks)"
    )
    sample_online_context: bool = _f(
        False, "infer each online posterior (meta-test, `PEARLAgent.infer_posterior`) from "
        "embedding_batch_size rows drawn uniformly with replacement from the context gathered "
        "so far, a fresh draw each time, as training collection infers it, instead of from all "
        "of it (ours; sparse-point-robot's default preset; not with rnn-traj; README)"
    )
    eval_interval: int = _f(1, "evaluate every this many iterations (and at the last)")
    agent_average_iterations: int = _f(
        0, "evaluate, checkpoint for deployment and `metapearl eval` a moving average of the "
        "agent's (encoder and policy) weights over about this many recent iterations instead of "
        "the last iterate; training and collection use the last iterate (0: off, the paper's; "
        "ours: sparse-point-robot's and ant-dir's default presets, README)"
    )
    # engineering
    max_parallel_envs: int = _f(64, "environments stepped side by side in collection and evaluation")
    torch_threads: int = _f(
        0, "CPU compute threads: torch's, or under numpy matmuls those a gradient step splits its "
        "tasks over, everything else then on one (0: torch's default, one per physical core)"
    )
    cpu_gemm: str = _f(
        "auto", "on CPU, the library of the networks' matmuls: numpy (its BLAS, with each gradient "
        "step's tasks split over torch_threads threads), torch (each op on torch_threads threads), "
        "or auto (numpy on an AMD CPU for updates of 2^28 or more multiply-accumulates per hidden RL "
        "layer, meta_batch x batch_size x net_size^2, as 16 x 256 x 300^2, else torch; see "
        "metapearl/cpu.py); a CUDA run always uses torch"
    )
    cuda_graphs: bool = _f(
        False, "on CUDA (device cuda), replay each gradient step from CUDA graphs "
        "(metapearl/graphs.py; the pog encoder with diagonal factors (factor_rank 0) and "
        "independent context transitions (context_trajectories false) only; torch >= 2.4)"
    )
    tensorboard: bool = _f(
        False, "also write progress.csv's scalars as TensorBoard events (needs [tensorboard])"
    )

    def validate(self) -> PEARLConfig:
        """Raise ConfigError naming the first invalid value; return self when all are valid."""
        from metapearl.tasks import family_names

        if self.family not in family_names():
            raise unknown_family(self.family)
        positive = [
            "num_train_tasks", "num_test_tasks", "max_path_length", "latent_size", "net_size",
            "encoder_size", "meta_batch", "batch_size", "embedding_batch_size", "num_iterations",
            "update_post_train", "num_steps_per_eval", "num_evals", "eval_interval",
            "max_parallel_envs", "replay_buffer_size", "num_exp_traj_eval",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = [
            "seed", "rnn_bptt_steps", "factor_rank", "num_initial_steps", "num_tasks_sample",
            "num_steps_prior", "num_steps_posterior", "num_extra_rl_steps_posterior",
            "num_train_steps_per_itr", "kl_lambda", "policy_mean_reg_weight",
            "policy_std_reg_weight", "torch_threads", "agent_average_iterations",
        ]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.kl_lambda_at(0)  # parses kl_lambda_schedule
        fewest = -(-self.num_steps_per_eval // self.max_path_length)  # trajectories per meta-test
        if fewest <= self.num_exp_traj_eval:
            raise ConfigError(
                f"num_steps_per_eval {self.num_steps_per_eval} holds as few as {fewest} "
                f"{'trajectory' if fewest == 1 else 'trajectories'} of max_path_length "
                f"{self.max_path_length}, and the first num_exp_traj_eval "
                f"({self.num_exp_traj_eval}) run before any posterior: the reported last "
                "trajectory would not be adapted. Raise num_steps_per_eval to more than "
                f"{self.num_exp_traj_eval * self.max_path_length}"
                + (" or lower num_exp_traj_eval" if self.num_exp_traj_eval > 1 else "")
            )
        if self.seed >= SEED_LIMIT:
            raise ConfigError(f"seed must be < 2**32, got {self.seed}")
        for name in ("lr", "reward_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError(f"discount must be in [0, 1], got {self.discount}")
        if not 0.0 < self.soft_target_tau <= 1.0:
            raise ConfigError(f"soft_target_tau must be in (0, 1], got {self.soft_target_tau}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.cpu_gemm not in CPU_GEMMS:
            raise ConfigError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {self.cpu_gemm!r}")
        if self.context_sampler not in CONTEXT_SAMPLERS:
            raise ConfigError(
                f"context_sampler must be one of {', '.join(CONTEXT_SAMPLERS)}, "
                f"got {self.context_sampler!r}"
            )
        if self.num_initial_steps == 0:
            raise ConfigError("num_initial_steps must be >= 1: gradient steps and evaluation draw "
                              "from every training task's buffers from the first iteration on")
        if (self.context_sampler == "recent" and self.num_tasks_sample > 0
                and self.num_steps_prior + self.num_steps_posterior == 0):
            raise ConfigError("the recent context sampler needs num_steps_prior or "
                              "num_steps_posterior > 0: every drawn task's encoder buffer is "
                              "cleared and refilled only by those phases")
        if self.num_eval_train_tasks == 0 or self.num_eval_train_tasks < -1:
            raise ConfigError("num_eval_train_tasks must be -1 or >= 1")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ConfigError(f"cuda_graphs needs a CUDA device, got device {self.device!r}")
        if self.cuda_graphs and self.encoder != "pog":
            raise ConfigError(f"cuda_graphs supports the pog encoder only, got {self.encoder!r}")
        if self.factor_rank and (self.encoder != "pog" or not self.use_information_bottleneck):
            also = " --set posterior_mean_bound=0" if self.encoder != "pog" else ""
            raise ConfigError("factor_rank > 0 needs the pog encoder with "
                              "use_information_bottleneck=true (it shapes Gaussian factors); "
                              "point-robot's default preset has factor_rank 1: add "
                              f"--set factor_rank=0 --set factor_u_bound=0{also}")
        if self.factor_u_bound < 0:
            raise ConfigError(f"factor_u_bound must be >= 0, got {self.factor_u_bound}")
        if self.factor_u_bound and not self.factor_rank:
            raise ConfigError("factor_u_bound bounds the low-rank term of factor_rank > 0; with "
                              "factor_rank 0 set factor_u_bound=0")
        if self.posterior_mean_bound < 0:
            raise ConfigError(f"posterior_mean_bound must be >= 0, got {self.posterior_mean_bound}")
        if self.posterior_mean_bound and self.encoder != "pog":
            raise ConfigError("posterior_mean_bound bounds the pog encoder's product; the "
                              f"{self.encoder} encoder has none: set posterior_mean_bound=0")
        if self.sample_online_context and self.encoder == "rnn-traj":
            raise ConfigError("sample_online_context draws independent rows; the rnn-traj "
                              "encoder reads whole trajectories in order: set "
                              "sample_online_context=false")
        if self.context_trajectories and self.context_sampler == "off-policy-rl-batch":
            raise ConfigError("context_trajectories needs its own context batch: the "
                              "off-policy-rl-batch sampler reuses the RL batch")
        if self.context_trajectories and self.cuda_graphs:
            raise ConfigError("cuda_graphs samples independent transitions only "
                              "(context_trajectories false)")
        if self.factor_rank and self.cuda_graphs:
            raise ConfigError("cuda_graphs supports diagonal factors only (factor_rank 0)")
        return self

    def kl_lambda_at(self, iteration: int) -> float:
        """The KL weight of a meta-training iteration: kl_lambda, or the kl_lambda_schedule
        weight of the latest scheduled iteration <= `iteration`. Raises ConfigError for a
        malformed schedule."""
        weight, last = self.kl_lambda, 0
        for item in filter(None, (x.strip() for x in self.kl_lambda_schedule.split(","))):
            try:
                at, value = item.split(":")
                at, value = int(at), float(value)
            except ValueError:
                raise ConfigError(
                    f"kl_lambda_schedule must be ITERATION:WEIGHT pairs separated by commas, "
                    f"e.g. 300:0.1; got {self.kl_lambda_schedule!r}") from None
            if at <= last or not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"kl_lambda_schedule needs increasing iterations >= 1 and finite weights "
                    f">= 0; got {self.kl_lambda_schedule!r}")
            last = at
            if at <= iteration:
                weight = value
        return weight

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PEARLConfig:
        """Build a config from plain data (e.g. a run's config.json); unknown keys are errors."""
        cfg = cls()
        for key, value in values.items():
            _set_field(cfg, key, value)
        return cfg.validate()


CONTEXT_SAMPLERS = ("recent", "off-policy", "off-policy-rl-batch")
SEED_LIMIT = 2**32  # seeds are in [0, 2**32): numpy, torch and Gymnasium all take them
# Fields `train --resume --set` may change: how long a run goes on and how it computes (CPU threads,
# CPU matmul library: float32 rounding only; CUDA graphs), not what an iteration computes (so a
# finished run can be extended).
RESUME_FIELDS = ("num_iterations", "torch_threads", "cpu_gemm", "cuda_graphs")
# what `metapearl eval` may change in a trained run's config (the meta-test protocol)
EVAL_FIELDS = ("num_evals", "num_steps_per_eval", "num_exp_traj_eval", "sample_online_context")
ENCODERS = ("pog", "rnn-tran", "rnn-traj")


def unknown_family(name: str) -> ConfigError:
    """The error for a family name nobody registered, naming the known ones and the fix."""
    from metapearl.tasks import family_names

    return ConfigError(f"unknown task family {name!r}; known: {', '.join(family_names())} (a "
                       "family of your own is registered with register_family first: on the "
                       "command line, --import the module or .py file that does it)")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PEARLConfig))


def field_help() -> list[tuple[str, str, str]]:
    """(name, type, help) of every config field, in declaration order."""
    return [(f.name, str(f.type), f.metadata["help"]) for f in dataclasses.fields(PEARLConfig)]


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Convert a JSON value or a command-line string to the field's type, or raise ConfigError."""
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
            return out
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be of type {kind}, got {value!r}") from None


def _set_field(cfg: PEARLConfig, key: str, value: Any) -> None:
    types = {f.name: str(f.type) for f in dataclasses.fields(PEARLConfig)}
    if key not in types:
        close = [n for n in FIELD_NAMES if key.lower() in n or n in key.lower()]
        close += [n for n in difflib.get_close_matches(key.lower(), FIELD_NAMES) if n not in close]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; `metapearl config FAMILY` lists them")
    setattr(cfg, key, _coerce(key, types[key], value))


# --- presets -----------------------------------------------------------------------------------
# `paper`: SPEC section 7, the reference code's per-family config, exactly.
# `default`: our CPU preset, tuned so the family learns visibly in minutes on a 2-core laptop.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "point-robot": {
        "paper": dict(
            num_train_tasks=80, num_test_tasks=20, max_path_length=20, meta_batch=16,
            num_initial_steps=200, num_steps_prior=200, num_steps_posterior=0,
            num_extra_rl_steps_posterior=200, num_train_steps_per_itr=1000,
            embedding_batch_size=64, reward_scale=100.0, num_steps_per_eval=60,
        ),
        "default": dict(
            num_train_tasks=80, num_test_tasks=20, max_path_length=20, meta_batch=16,
            num_initial_steps=200, num_steps_prior=200, num_steps_posterior=0,
            num_extra_rl_steps_posterior=200, num_train_steps_per_itr=200,
            embedding_batch_size=40, num_steps_per_eval=60, num_iterations=150,
            # CPU sizes: small critic/policy (the task is 2-D), a full-width encoder (identifying
            # the goal from a few transitions is the hard part), a shorter effective horizon.
            # Factors with a rank-1 precision term (our extension, encoder.py): a transition's
            # "goal on a circle around s'" is a plane in (goal, |goal|^2) that diagonal factors
            # cannot hold; with diagonal ones the meta-test return stalls near -10.
            # Context batches of 2 whole trajectories, the context the scored trajectory acts on
            # (independent transitions from 10 trajectories train the encoder on richer context
            # than the meta-test gives it), with u bounded: unbounded, such contexts made the
            # critic blow up in most runs. With u bounded the product's mean could still
            # land beyond the factors' means (|mu| 13-23 against <= 10), and in some runs the
            # critic's error on that z diverged for good: the mean is squashed by 12 tanh(mu / 12),
            # under 1% smaller at the |mu| ~ 2 of a healthy run, 15% at 9.
            # (The runs behind each of these: docs/measurements.md, point-robot.)
            net_size=64, encoder_size=200, batch_size=64, lr=1e-3, discount=0.9,
            reward_scale=100.0, factor_rank=1, context_trajectories=True, factor_u_bound=10.0,
            posterior_mean_bound=12.0,
        ),
    },
    "sparse-point-robot": {
        "paper": dict(
            num_train_tasks=80, num_test_tasks=20, max_path_length=20, meta_batch=16,
            num_initial_steps=200, num_tasks_sample=10, num_steps_prior=100,
            num_steps_posterior=900, num_extra_rl_steps_posterior=0,
            num_train_steps_per_itr=1000, embedding_batch_size=1024, discount=0.9,
            reward_scale=100.0, kl_lambda=1.0, num_steps_per_eval=400, num_exp_traj_eval=5,
        ),
        "default": dict(
            num_train_tasks=80, num_test_tasks=20, max_path_length=20, meta_batch=16,
            num_initial_steps=200, num_tasks_sample=10, num_steps_prior=100,
            num_steps_posterior=900, num_extra_rl_steps_posterior=0,
            num_train_steps_per_itr=200, embedding_batch_size=128, discount=0.9,
            num_steps_per_eval=400, num_exp_traj_eval=5, num_iterations=1000,
            # CPU sizes as point-robot, context 128 of the ~1000 recent steps. With reward_scale
            # 20 the critic loss is ~25x smaller than at 100, so kl_lambda shrinks with it (at 1.0
            # the posterior stayed at the prior; 0.2 and 0.01 learned slower than 0.05)
            net_size=64, encoder_size=128, batch_size=64, lr=1e-3, reward_scale=20.0,
            kl_lambda=0.05,
            # the encoder only ever infers from 128 rows (training and collection); a product of
            # the meta-test's up to 400 rows is ~3x narrower and settles on a wrong goal
            sample_online_context=True,
            # late single iterates score about 10 points either side of their level; an average
            # over ~25 iterations scored 8 points above the iterates beside it
            # (both: docs/measurements.md, sparse-point-robot)
            agent_average_iterations=25,
        ),
    },
}


def _mujoco_presets(train: int, test: int, meta_batch: int, prior: int, extra: int,
                    grad_steps: int, embedding: int, cpu: dict[str, Any] | None = None,
                    **paper: Any) -> dict[str, dict[str, Any]]:
    """`paper` and `default` of a MuJoCo family from its SPEC section 7 row.

    `default` (CPU): 128-wide networks and encoder, at most 8 tasks of 128 transitions per
    gradient step, 500 gradient steps per iteration (about a tenth of the paper's compute per
    iteration on a 2-core CPU), evaluation every 5 iterations; the data schedule stays the paper's
    unless `cpu` (the family's own CPU changes, applied last) says otherwise.
    """
    row = dict(num_train_tasks=train, num_test_tasks=test, meta_batch=meta_batch,
               num_initial_steps=2000, num_steps_prior=prior, num_steps_posterior=0,
               num_extra_rl_steps_posterior=extra, num_train_steps_per_itr=grad_steps,
               embedding_batch_size=embedding, num_exp_traj_eval=2, **paper)
    defaults = dict(net_size=128, encoder_size=128, meta_batch=min(meta_batch, 8),
                    batch_size=128, num_train_steps_per_itr=500, num_iterations=300,
                    eval_interval=5)
    return {"paper": row, "default": {**row, **defaults, **(cpu or {})}}


PRESETS.update({
    "cheetah-vel": _mujoco_presets(100, 30, 16, 400, 600, 2000, 100, num_evals=1),
    "cheetah-dir": _mujoco_presets(2, 2, 4, 1000, 1000, 2000, 256, num_evals=4),
    # ant-dir on CPU: the generic CPU preset stayed below standing still (the survival bonus) for
    # an hour. 64-wide networks and encoder (a step 3.3x cheaper) take 3000 gradient steps per
    # iteration; lr 1e-3; reward_scale 20 (alpha 0.05: less entropy-driven flailing against the
    # control cost); discount 0.95 (so the survival bonus no longer dwarfs the velocity term in
    # Q); 2 tasks x 128 rows per step (a step 1.3x cheaper than 4 x 128, and 55-minute runs scored
    # no lower); 200/300 steps per iteration; the agent averaged over ~10 iterations. Within an
    # hour it rises visibly above standing still in 4 of 5 seeds (docs/measurements.md,
    # "Other MuJoCo families")
    "ant-dir": _mujoco_presets(2, 2, 4, 400, 600, 4000, 256, num_evals=4, cpu=dict(
        net_size=64, encoder_size=64, meta_batch=2, embedding_batch_size=128,
        num_train_steps_per_itr=3000, num_steps_prior=200, num_extra_rl_steps_posterior=300,
        lr=1e-3, reward_scale=20.0, discount=0.95, agent_average_iterations=10)),
    "ant-goal": _mujoco_presets(150, 30, 10, 400, 600, 4000, 256, kl_lambda=1.0),
    # humanoid-dir on CPU: with 348-dim observations a step on 8 tasks x 256 context rows took
    # 36 ms here (ant-dir's 4 tasks: 11 ms), so 4 tasks x 128 rows; 400 initial steps per task
    # (2000 took 5 minutes), 200/300 per iteration; 5 training tasks in each evaluation (with 30,
    # evaluation's physics took a third of a run)
    "humanoid-dir": _mujoco_presets(100, 30, 16, 400, 600, 4000, 256, cpu=dict(
        meta_batch=4, embedding_batch_size=128, num_initial_steps=400, num_steps_prior=200,
        num_extra_rl_steps_posterior=300, num_eval_train_tasks=5)),
    "walker-rand-params": _mujoco_presets(40, 10, 10, 400, 600, 4000, 100,
                                          use_next_obs_in_context=True),
    "hopper-rand-params": _mujoco_presets(40, 10, 10, 400, 600, 4000, 100,
                                          use_next_obs_in_context=True),
})


# Families without a preset table (those users register): `paper` is SPEC section 7's defaults
# row as it stands (the dataclass defaults); `default` shrinks the networks, the task sets and the
# gradient steps to a size that trains on a laptop CPU. It is a starting point, not tuned per family.
GENERIC_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "default": dict(
        num_train_tasks=40, num_test_tasks=10, net_size=128, encoder_size=128, batch_size=128,
        num_initial_steps=1000, num_train_steps_per_itr=500, num_iterations=200,
    ),
}


def make_config(
    family: str, preset: str = "default", overrides: dict[str, Any] | None = None
) -> PEARLConfig:
    """The config of `family` under `preset`, with `overrides` (field -> value) applied on top.

    Families registered by users have no preset table of their own: they get GENERIC_PRESETS.
    """
    from metapearl.tasks import family_names, get_family

    if family not in family_names():
        raise unknown_family(family)
    table = PRESETS.get(family, GENERIC_PRESETS)
    if preset not in table:
        raise ConfigError(
            f"unknown preset {preset!r} for {family}; known: {', '.join(sorted(table))}"
        )
    cfg = PEARLConfig(family=family, preset=preset)
    fam = get_family(family)
    cfg.max_path_length = fam.max_path_length
    for key, value in table[preset].items():
        _set_field(cfg, key, value)
    if table is GENERIC_PRESETS:  # SPEC's 600 steps: 3 of 200; a longer episode gets 1 adapted
        cfg.num_steps_per_eval = max(cfg.num_steps_per_eval,
                                     (cfg.num_exp_traj_eval + 1) * cfg.max_path_length)
    for key, value in (overrides or {}).items():
        if key == "family":
            raise ConfigError("family is chosen by the positional argument, not by --set")
        if key == "preset":  # the label would name values the run does not have
            raise ConfigError("preset is chosen by --preset, not by --set")
        _set_field(cfg, key, value)
    return cfg.validate()


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parse ``key=value`` strings from the command line."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
