"""metapearl: PEARL meta-reinforcement learning (Rakelly et al. 2019) on today's PyTorch."""

from metapearl.agent import PEARLAgent
from metapearl.config import ConfigError, PEARLConfig, make_config
from metapearl.tasks import TaskFamily, get_family, register_family
from metapearl.trainer import Summary, Trainer, train

__all__ = [
    "ConfigError", "PEARLAgent", "PEARLConfig", "Summary", "TaskFamily", "Trainer",
    "get_family", "make_config", "register_family", "train",
]
__version__ = "0.1.0"
