"""`python -m worldmodel.stage=<name> [overrides]`, the command the project was specified with, runs the
app as `python -m worldmodel stage=<name> [overrides]` does.

`python -m` imports the package `worldmodel` and then asks the import system for a module named
`stage=<name>` inside it; this finder, installed when the package is imported, answers for any such name
with code that puts `stage=<name>` in front of the overrides and starts the Hydra app. No file per
stage: the stage name is checked by the app like any override.

A worker started with multiprocessing's `spawn` re-runs the parent's main module under the name
`__mp_main__` (it skips only a package's `__main__`), with the parent's `sys.argv`. So the code runs
the app only as `__main__`: a worker must never start the app again, nor add `stage=<name>` twice.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import CodeType, ModuleType

PREFIX = "worldmodel.stage="


class StageCommand(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if not fullname.startswith(PREFIX):
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=fullname)

    def get_source(self, fullname: str) -> str:
        stage = fullname.removeprefix(PREFIX)
        return (
            "if __name__ == '__main__':\n"
            "    import sys\n"
            "    from worldmodel.__main__ import main\n"
            f"    sys.argv[1:1] = [{f'stage={stage}'!r}]\n"
            "    main()\n"
        )

    def get_code(self, fullname: str) -> CodeType:  # what runpy runs as __main__
        return compile(self.get_source(fullname), f"<{fullname}>", "exec")

    def exec_module(self, module: ModuleType) -> None:  # a plain import defines nothing and runs nothing
        exec(self.get_code(module.__name__), module.__dict__)


def install() -> None:
    if not any(isinstance(finder, StageCommand) for finder in sys.meta_path):
        sys.meta_path.append(StageCommand())
