"""World Models (Ha & Schmidhuber, 2018) on gymnasium pixels: Hydra stages tracked in MLflow."""

from worldmodel import command
from worldmodel.config import register_resolvers
from worldmodel.envs import dream as dream_env

register_resolvers()
command.install()  # python -m worldmodel.stage=<name> …
dream_env.register()  # gymnasium.make("worldmodel/Dream-v0", run_id=…)
