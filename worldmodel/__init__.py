"""World Models (Ha & Schmidhuber, 2018) on gymnasium pixels: Hydra stages tracked in MLflow."""

from worldmodel import command, dream_env
from worldmodel.config import register_resolvers

register_resolvers()
command.install()  # python -m worldmodel.stage=<name> …
dream_env.register()  # gymnasium.make("worldmodel/Dream-v0", run_id=…)
