"""A user-defined task family: Pendulum swing-up where gravity changes from task to task.

`python examples/pendulum_gravity.py` trains it for 30 iterations; the command line sees it
through --import, e.g. `metapearl train pendulum-gravity --import examples/pendulum_gravity.py`
and `metapearl eval runs/pendulum-gravity --import examples/pendulum_gravity.py`.
"""

import gymnasium as gym

from metapearl import TaskFamily, make_config, register_family, train


class PendulumGravity(TaskFamily):
    name = "pendulum-gravity"
    max_path_length = 200
    task_parameter = "gravity g ~ U(2, 20)"

    def make_env(self):
        return gym.make("Pendulum-v1").unwrapped  # metapearl cuts episodes itself

    def sample_task(self, rng):
        return {"g": float(rng.uniform(2.0, 20.0))}

    def set_task(self, env, task):
        env.g = task["g"]


register_family(PendulumGravity())  # on import, so that --import makes it known

if __name__ == "__main__":
    cfg = make_config("pendulum-gravity", overrides={"num_iterations": 30})
    print(train(cfg, "runs/pendulum-gravity").line(cfg.family, cfg.seed))
