"""World Models (Ha & Schmidhuber, 2018) on CarRacing-v3: Hydra stages tracked in MLflow."""

from worldmodel.config import register_resolvers

register_resolvers()
