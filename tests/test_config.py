import json

import pytest

from metapearl.cli import main
from metapearl.config import ConfigError, PEARLConfig, make_config

# SPEC section 7, written out here independently of the preset table.
SPEC_DEFAULTS = dict(latent_size=5, net_size=300, encoder_size=200, batch_size=256, lr=3e-4,
                     soft_target_tau=0.005, discount=0.99, reward_scale=5.0, kl_lambda=0.1,
                     num_iterations=500, num_tasks_sample=5, num_steps_posterior=0,
                     update_post_train=1, num_steps_per_eval=600, num_evals=2,
                     num_exp_traj_eval=1)
SPEC_PAPER = {
    "point-robot": dict(num_train_tasks=80, num_test_tasks=20, meta_batch=16,
                        num_initial_steps=200, num_steps_prior=200, num_steps_posterior=0,
                        num_extra_rl_steps_posterior=200, num_train_steps_per_itr=1000,
                        embedding_batch_size=64, reward_scale=100.0, max_path_length=20,
                        num_steps_per_eval=60),
    "sparse-point-robot": dict(num_train_tasks=80, num_test_tasks=20, meta_batch=16,
                               num_initial_steps=200, num_steps_prior=100,
                               num_steps_posterior=900, num_extra_rl_steps_posterior=0,
                               num_train_steps_per_itr=1000, embedding_batch_size=1024,
                               discount=0.9, reward_scale=100.0, kl_lambda=1.0,
                               num_tasks_sample=10, num_steps_per_eval=400, num_exp_traj_eval=5,
                               max_path_length=20),
}
# the MuJoCo rows: (train, test, meta_batch, init, prior, post, extra, grad steps, embedding)
for _name, _row, _notes in [
    ("cheetah-vel", (100, 30, 16, 2000, 400, 0, 600, 2000, 100), dict(num_evals=1)),
    ("cheetah-dir", (2, 2, 4, 2000, 1000, 0, 1000, 2000, 256), dict(num_evals=4)),
    ("ant-dir", (2, 2, 4, 2000, 400, 0, 600, 4000, 256), dict(num_evals=4)),
    ("ant-goal", (150, 30, 10, 2000, 400, 0, 600, 4000, 256), dict(kl_lambda=1.0)),
    ("humanoid-dir", (100, 30, 16, 2000, 400, 0, 600, 4000, 256), {}),
    ("walker-rand-params", (40, 10, 10, 2000, 400, 0, 600, 4000, 100),
     dict(use_next_obs_in_context=True)),
    ("hopper-rand-params", (40, 10, 10, 2000, 400, 0, 600, 4000, 100),
     dict(use_next_obs_in_context=True)),
]:
    SPEC_PAPER[_name] = dict(zip(
        ["num_train_tasks", "num_test_tasks", "meta_batch", "num_initial_steps", "num_steps_prior",
         "num_steps_posterior", "num_extra_rl_steps_posterior", "num_train_steps_per_itr",
         "embedding_batch_size"], _row, strict=True),
        max_path_length=200, num_exp_traj_eval=2, **_notes)


@pytest.mark.parametrize("family", sorted(SPEC_PAPER))
def test_paper_preset_is_spec_section_7(family):
    cfg = make_config(family, "paper").to_dict()
    # the paper's model: diagonal Gaussian factors (factor_rank 0), the pog encoder
    expected = {**SPEC_DEFAULTS, "use_next_obs_in_context": False, "factor_rank": 0,
                "encoder": "pog", "context_trajectories": False, "factor_u_bound": 0.0,
                "posterior_mean_bound": 0.0, "sample_online_context": False,
                **SPEC_PAPER[family]}
    for key, value in expected.items():
        assert cfg[key] == value, key
    assert cfg["use_information_bottleneck"]


def test_overrides_are_typed_and_checked():
    cfg = make_config("point-robot", "default",
                      {"kl_lambda": "0.5", "num_iterations": "7", "use_next_obs_in_context": "true"})
    assert cfg.kl_lambda == 0.5 and cfg.num_iterations == 7 and cfg.use_next_obs_in_context
    for bad, match in [({"kl_lamda": "1"}, "unknown config key 'kl_lamda'"),
                       ({"num_iterations": "ten"}, "must be of type int"),
                       ({"num_iterations": "2.5"}, "must be of type int"),
                       ({"meta_batch": "0"}, "meta_batch must be >= 1"),
                       ({"discount": "1.5"}, "discount must be in"),
                       ({"lr": "nan"}, "must be of type float"),
                       ({"context_sampler": "weird"}, "context_sampler must be one of"),
                       ({"seed": str(2**32)}, "seed must be < 2\\*\\*32"),
                       ({"num_steps_prior": "0", "num_steps_posterior": "0"},
                        "recent context sampler needs")]:
        with pytest.raises(ValueError, match=match):
            make_config("point-robot", "default", bad)


def test_config_json_round_trip():
    cfg = make_config("sparse-point-robot", "paper", {"seed": "3"})
    again = PEARLConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-family"], "unknown task family 'no-such-family'"),
    (["train", "point-robot", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "point-robot", "--set", "batch_size"], "--set expects key=value"),
    (["train", "point-robot", "--set", "batchsize=3"], "unknown config key"),
    (["eval", "/nonexistent/run"], "is not a metapearl run"),
])
def test_cli_bad_input_gets_one_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_tasks_and_config(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "point-robot" in out and "sparse-point-robot" in out and "20" in out
    assert main(["config", "point-robot", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "num_train_steps_per_itr" in out and "1000" in out


def test_user_family_gets_the_generic_presets():
    import gymnasium as gym

    from metapearl import TaskFamily, register_family

    class Flat(TaskFamily):
        name = "test-flat"
        max_path_length = 7
        task_parameter = "none"

        def make_env(self):
            return gym.make("Pendulum-v1").unwrapped

        def sample_task(self, rng):
            return {}

        def set_task(self, env, task):
            pass

    register_family(Flat())
    paper, default = make_config("test-flat", "paper"), make_config("test-flat", "default")
    for key, value in SPEC_DEFAULTS.items():
        assert getattr(paper, key) == value, key
    assert paper.max_path_length == default.max_path_length == 7
    assert default.net_size < paper.net_size and default.num_train_steps_per_itr < 2000
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("test-flat", "huge")


@pytest.mark.parametrize("argv, message", [
    (["train", "point-robot", "--seed", "-1"], "must be in [0, 4294967296), got -1"),
    (["eval", "runs/x", "--seed", "2e3"], "not an integer: '2e3'"),
    (["video", "runs/x", "--every", "0"], "must be >= 1, got 0"),
    (["video", "runs/x", "--trajectories", "0"], "must be >= 1, got 0"),
    (["plot", "runs/x", "--tasks", "-2"], "must be >= 0, got -2"),
])
def test_cli_rejects_out_of_range_numbers_before_doing_anything(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_run_of_an_unregistered_family_says_to_register_it(tmp_path, capsys):
    config = make_config("point-robot", "default").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "family": "my-family"}))
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown task family 'my-family'" in err and "register_family" in err


def test_factor_rank_needs_the_stochastic_pog_encoder(tiny_config):
    assert tiny_config(factor_rank=2).factor_rank == 2
    with pytest.raises(ConfigError, match="factor_rank must be >= 0, got -1"):
        tiny_config(factor_rank=-1)
    for bad in ({"encoder": "rnn-tran"}, {"use_information_bottleneck": False}):
        with pytest.raises(ConfigError, match="factor_rank > 0 needs the pog encoder"):
            tiny_config(factor_rank=1, **bad)
    assert tiny_config(factor_rank=1, factor_u_bound=5).factor_u_bound == 5.0
    with pytest.raises(ConfigError, match="factor_u_bound must be >= 0, got -1.0"):
        tiny_config(factor_rank=1, factor_u_bound=-1)
    with pytest.raises(ConfigError, match="with factor_rank 0 set factor_u_bound=0"):
        tiny_config(factor_u_bound=10)
    with pytest.raises(ConfigError, match="--set factor_rank=0 --set factor_u_bound=0 "
                                          "--set posterior_mean_bound=0$"):
        make_config("point-robot", "default", {"encoder": "rnn-tran"})
    advised = {"factor_rank": 0, "factor_u_bound": 0, "posterior_mean_bound": 0}
    assert make_config("point-robot", "default", {"encoder": "rnn-tran", **advised}).factor_rank == 0
    with pytest.raises(ConfigError, match="--set factor_u_bound=0$"):  # pog keeps its mean bound
        make_config("point-robot", "default", {"use_information_bottleneck": False})
    with pytest.raises(ConfigError, match="cuda_graphs supports diagonal factors only"):
        tiny_config(factor_rank=1, cuda_graphs=True, device="cuda")


def test_sample_online_context_is_sparse_point_robots_and_not_for_rnn_traj(tiny_config):
    assert make_config("sparse-point-robot", "default").sample_online_context
    assert not make_config("point-robot", "default").sample_online_context
    assert tiny_config(sample_online_context=True, encoder="rnn-tran").sample_online_context
    with pytest.raises(ConfigError, match="rnn-traj encoder reads whole trajectories"):
        tiny_config(sample_online_context=True, encoder="rnn-traj")


def test_agent_averaging_presets_and_not_negative(tiny_config):
    assert make_config("sparse-point-robot", "default").agent_average_iterations == 25
    assert make_config("ant-dir", "default").agent_average_iterations == 10
    for family in ("point-robot", "cheetah-vel", "ant-goal"):
        assert make_config(family, "default").agent_average_iterations == 0
    for family in ("sparse-point-robot", "ant-dir"):
        assert make_config(family, "paper").agent_average_iterations == 0
    with pytest.raises(ConfigError, match="agent_average_iterations must be >= 0, got -1"):
        tiny_config(agent_average_iterations=-1)


def test_posterior_mean_bound_needs_the_pog_encoder(tiny_config):
    assert tiny_config(posterior_mean_bound=3).posterior_mean_bound == 3.0
    with pytest.raises(ConfigError, match="posterior_mean_bound must be >= 0, got -1.0"):
        tiny_config(posterior_mean_bound=-1)
    with pytest.raises(ConfigError, match="the rnn-traj encoder has none: set posterior_mean_b"):
        tiny_config(posterior_mean_bound=3, encoder="rnn-traj")


def test_context_trajectories_need_a_context_batch_of_their_own(tiny_config):
    assert tiny_config(context_trajectories=True, context_sampler="off-policy").context_trajectories
    with pytest.raises(ConfigError, match="off-policy-rl-batch sampler reuses the RL batch"):
        tiny_config(context_trajectories=True, context_sampler="off-policy-rl-batch")
    with pytest.raises(ConfigError, match="cuda_graphs samples independent transitions only"):
        tiny_config(context_trajectories=True, cuda_graphs=True, device="cuda")


def test_cuda_graphs_need_a_cuda_device_and_the_pog_encoder(tiny_config):
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device, got device 'cpu'"):
        tiny_config(cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs supports the pog encoder only, got 'rnn-tran'"):
        tiny_config(cuda_graphs=True, device="cuda", encoder="rnn-tran")


def test_kl_lambda_schedule_gives_each_iteration_its_weight(tiny_config):
    cfg = tiny_config(kl_lambda=0.05, kl_lambda_schedule="300:0.1, 500:0")
    assert [cfg.kl_lambda_at(i) for i in (0, 299, 300, 499, 500, 10_000)] == [
        0.05, 0.05, 0.1, 0.1, 0.0, 0.0]
    assert tiny_config(kl_lambda=0.3).kl_lambda_at(1000) == 0.3  # no schedule
    for bad in ("300", "300:x", "0:0.1", "300:0.1,200:0.2", "300:-1", "300:inf", "300:nan"):
        with pytest.raises(ConfigError, match="kl_lambda_schedule"):
            tiny_config(kl_lambda_schedule=bad)


def test_the_reported_trajectory_must_come_after_the_exploration_ones(tiny_config):
    # max_path_length 10: 40 steps hold 4 trajectories, 31 at least 4 (whole trajectories)
    assert tiny_config(num_exp_traj_eval=3, num_steps_per_eval=40).num_exp_traj_eval == 3
    assert tiny_config(num_exp_traj_eval=3, num_steps_per_eval=31).num_steps_per_eval == 31
    with pytest.raises(ConfigError, match="holds as few as 4 trajectories of max_path_length 10"):
        tiny_config(num_exp_traj_eval=4, num_steps_per_eval=40)
    with pytest.raises(ConfigError, match="lower num_exp_traj_eval"):
        tiny_config(num_exp_traj_eval=3, num_steps_per_eval=30)


def test_a_long_episode_family_gets_a_meta_test_that_adapts():
    from metapearl import TaskFamily, register_family

    class Long(TaskFamily):
        name = "test-long-episodes"
        max_path_length = 1000

        def make_env(self):
            return None

        def sample_task(self, rng):
            return {}

        def set_task(self, env, task):
            pass

    register_family(Long())
    for preset in ("paper", "default"):
        cfg = make_config("test-long-episodes", preset)
        assert cfg.num_steps_per_eval == 2000 and cfg.num_exp_traj_eval == 1
    assert make_config("point-robot", "paper").num_steps_per_eval == 60  # presets keep theirs


def test_eval_can_mend_a_stored_protocol_that_leaves_no_adapted_trajectory(tiny_config, tmp_path,
                                                                            capsys):
    from metapearl import train

    run = tmp_path / "run"
    train(tiny_config(num_iterations=1), run, progress=False)
    stored = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**stored, "num_exp_traj_eval": 4}))  # 40 of 10
    assert main(["eval", str(run)]) == 2
    assert "holds as few as 4 trajectories" in capsys.readouterr().err
    assert main(["eval", str(run), "--num-exp-traj-eval", "2"]) == 0
    assert main(["eval", str(run), "--num-steps-per-eval", "50"]) == 0
    assert (run / "eval" / "meta_test_itr1_num_steps_per_eval50.csv").exists()
