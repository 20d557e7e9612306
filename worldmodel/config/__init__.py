"""Config helpers: the project root resolver, typed settings, fail-fast validation, flattening for MLflow
params."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from worldmodel.errors import WorldModelError

_PACKAGE = Path(__file__).resolve().parent.parent  # worldmodel/
# In a clone (or an editable install) the configs are the repo's conf/, and runs write under the repo;
# an installed wheel carries them inside the package (worldmodel/conf), and runs write under the
# working directory.
IN_REPO = (_PACKAGE.parent / "conf" / "config.yaml").is_file()
PROJECT_ROOT = _PACKAGE.parent if IN_REPO else Path.cwd()
CONFIG_DIR = PROJECT_ROOT / "conf" if IN_REPO else _PACKAGE / "conf"
STAGES = ("collect", "merge", "train_vae", "encode", "train_rnn", "evolve", "evaluate", "dream")
TOOLS = ("play",)  # stages outside the pipeline: they read runs and make nothing the pipeline reads
# Stages that can continue a run (inputs.resume); the others are quick to run again.
RESUMABLE = ("collect", "train_vae", "train_rnn", "evolve")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wm_root"):
        OmegaConf.register_new_resolver("wm_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("wm_pid"):
        # Two stages started in the same second must not share a Hydra output directory.
        OmegaConf.register_new_resolver("wm_pid", lambda: str(os.getpid()))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"a.b.c": value}, lists kept as their string form (MLflow params are strings)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


# ---- validation: one line naming the key, before any work starts -------------------------------


Settings = TypeVar("Settings")


def settings(cfg: DictConfig, cls: type[Settings]) -> Settings:
    """The config section `cls.SECTION` as a `cls`, a dataclass: every key of its declared type (an int
    where a float is declared becomes a float), choices as enums, ranges checked by the dataclass's
    `__post_init__` (with `require`). An unknown, ill-typed or out-of-range key fails in one line that
    names it, before any work starts. A value is never coerced from another kind (a string, a bool
    for a number): code that reads the raw config would see another value than the settings."""
    name = cls.SECTION
    section = OmegaConf.to_container(cfg[name], resolve=True)  # interpolations may point anywhere
    _check_kinds(cls, section)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), section))
    except OmegaConfBaseException as err:
        key = f"{name}.{err.key}" if err.key else name
        if "not in" in str(err.msg):
            raise WorldModelError(f"unknown config key '{key}'; see `--cfg job` for the keys") from err
        raise WorldModelError(
            f"config key '{key}' must be {_expected(cls, str(err.key))} (got {_get(cfg, key)!r})"
        ) from err


_KINDS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _check_kinds(cls: type, section: dict[str, Any]) -> None:
    """Numbers are numbers and booleans booleans, as written (OmegaConf would read '3' and 'off')."""
    for field, kind in get_type_hints(cls).items():
        value = section.get(field)
        if value is None:
            continue  # OmegaConf refuses a null where the type has none
        kind = _unwrap_optional(kind)
        element = get_args(kind)[0] if get_origin(kind) is list else None
        values = value if element is not None and isinstance(value, list) else [value]
        wanted = _KINDS.get(element or kind)
        if wanted is None:
            continue
        ok = all(isinstance(v, wanted) and (bool in wanted or not isinstance(v, bool)) for v in values)
        if not ok or (element is not None and not isinstance(value, list)):
            what = f"a list of {_expected_kind(element)}s" if element is not None else _expected(cls, field)
            raise WorldModelError(f"config key '{cls.SECTION}.{field}' must be {what} (got {value!r})")


def _unwrap_optional(kind: Any) -> Any:
    if get_origin(kind) in (Union, UnionType):
        return next(k for k in get_args(kind) if k is not type(None))
    return kind


def _expected_kind(kind: type) -> str:
    return {int: "integer", float: "number", bool: "boolean", str: "string"}[kind]


def _expected(cls: type, field: str) -> str:
    kind = get_type_hints(cls).get(field)
    nullable = get_origin(kind) in (Union, UnionType) and type(None) in get_args(kind)
    kind = _unwrap_optional(kind)
    if isinstance(kind, type) and issubclass(kind, Enum):
        text = f"one of {[m.value for m in kind]}"
    else:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        text = names.get(kind, f"a {getattr(kind, '__name__', kind)}")
    return f"null or {text}" if nullable else text


def require(section: object, ok: Callable[[Any], bool], expected: str, *fields: str) -> None:
    """Each of `fields` of a settings dataclass passes `ok`, else one line naming its config key."""
    for field in fields:
        value = getattr(section, field)
        if not _passes(ok, value):
            shown = value.value if isinstance(value, Enum) else value
            raise WorldModelError(
                f"config key '{section.SECTION}.{field}' must be {expected} (got {shown!r})"
            )


def positive(v: float) -> bool:
    return v > 0


def at_least_zero(v: float) -> bool:
    return v >= 0


def null_or_positive(v: int | None) -> bool:
    return v is None or v > 0


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(value, ListConfig):
        return list(value)
    return value


def _passes(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except (TypeError, ValueError):  # a value of the wrong type fails the check, not the program
        return False


def check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expected: str) -> None:
    value = _get(cfg, key)
    if not _passes(ok, value):
        raise WorldModelError(f"config key '{key}' must be {expected} (got {value!r})")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        check(cfg, key, lambda v: is_int(v) and v > 0, "a positive integer")


def positive_number(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        check(
            cfg,
            key,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
            "a positive number",
        )


def non_negative_numbers(cfg: DictConfig, *keys: str) -> None:
    """Each key a number ≥ 0, or a list of them (one per action dimension, say)."""
    for key in keys:
        check(
            cfg,
            key,
            lambda v: all(
                isinstance(x, int | float) and not isinstance(x, bool) and x >= 0
                for x in (v if isinstance(v, list) else [v])
            ),
            "a number ≥ 0, or a list of them",
        )


def one_of(cfg: DictConfig, key: str, choices: Iterable[Any]) -> None:
    choices = list(choices)
    check(cfg, key, lambda v: v in choices, f"one of {choices}")


def resumable(cfg: DictConfig, stage: str) -> None:
    """inputs.resume only for a stage that can continue a run (it would be silently ignored otherwise)."""
    check(
        cfg,
        "inputs.resume",
        lambda v: v is None or stage in RESUMABLE,
        f"null: {stage} cannot resume a run (only {', '.join(RESUMABLE)} can); run it again",
    )


def validate_common(cfg: DictConfig) -> None:
    """Settings every stage relies on."""
    check(cfg, "seed", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    positive_int(cfg, "env.image_size", "latent.size")
    for side in ("top", "bottom", "left", "right"):
        check(cfg, f"env.crop.{side}", lambda v: is_int(v) and v >= 0, "an integer ≥ 0 (pixels removed)")
    one_of(cfg, "env.frames", ["observation", "render"])
    one_of(cfg, "env.resample", ["lanczos", "min"])
    check(
        cfg,
        "env.pixel_range",
        lambda v: v is None or (len(v) == 2 and all(is_int(x) for x in v) and 0 <= v[0] < v[1] <= 255),
        "null or [lo, hi] with 0 ≤ lo < hi ≤ 255",
    )
    check(
        cfg,
        "env.widen",
        lambda v: v is None or (len(v) == 2 and all(is_int(x) and x >= 1 for x in v)),
        "null or [rows, cols], each an integer ≥ 1",
    )
    if cfg.env.get("fast_render"):  # the fast renderer leaves the dashboard rows black
        check(cfg, "env.crop.bottom", lambda v: v >= 12, "≥ 12 with env.fast_render=true (or set it false)")
    one_of(cfg, "env.action.kind", ["box", "discrete"])
    one_of(cfg, "device.type", ["auto", "cpu", "cuda", "mps"])
    one_of(cfg, "agent.z", ["mean", "sample"])
    for stage in (*STAGES, "resume"):
        check(
            cfg,
            f"inputs.{stage}",
            lambda v, s=stage: v is None or (isinstance(v, str) and v.strip()) or _run_ids(v, s),
            "null or a run id" + (" or a non-empty list of run ids" if stage in LISTS else ""),
        )
    names = [*STAGES, *TOOLS, "pipeline"]
    check(cfg, "stage.name", lambda v: v in names, f"one of {names}")
    if cfg.stage.name != "pipeline":  # the pipeline hands inputs.resume to its first stage
        resumable(cfg, cfg.stage.name)


LISTS = ("collect", "evolve")  # inputs that may name several runs (merge; the fidelity check)


def _run_ids(value: Any, stage: str) -> bool:
    return (
        stage in LISTS
        and isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, str) and v.strip() for v in value)
    )


def refuse_added_keys(overrides: Iterable[str], groups: Iterable[str]) -> None:
    """`+key=value` and `++key=value` may not bring in a key the config does not have: a typo
    (`+collect.episdoes=2`) would otherwise run with the default and log the typo as a param. Config
    groups (`+experiment=smoke`) and Hydra's own keys are left alone. Runs inside the Hydra app."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = set(groups)
    added = [
        o
        for o in parsed
        if (o.is_add() or o.is_force_add())
        and o.key_or_group not in groups
        and not o.key_or_group.startswith("hydra")
    ]
    if not added:
        return
    keep = [o.input_line for o in parsed if o not in added]
    known = flatten(OmegaConf.to_container(compose(config_name="config", overrides=keep)))
    for o in added:
        key = o.key_or_group
        if key not in known and not any(k.startswith(key + ".") for k in known):
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "; see `--cfg job` for the keys"
            raise WorldModelError(f"unknown config key '{key}' (from {o.input_line}){hint}")
