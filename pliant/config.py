"""The job config: one YAML file, validated by a schema composed of the sections each layer
owns. A bad value is rejected with a message that names the file, the key, the value and
what is allowed.

It sits above rl (whose sections it composes) and below bench and launch, which both load job
configs (docs/architecture.md section 2)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pliant.comm.monitor.spec import FaultSpec
from pliant.planner.errors import InputError
from pliant.planner.spec import ClusterSpec, CostSpec, ModelSpec, PlannerSpec
from pliant.rl.spec import CopyTaskSpec, LearnerSpec, ResourcesSpec, RLSpec, TaskSpec
from pliant.runtime.spec import DataSpec, TrainSpec


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `6.74e9` is a string; read it as a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


class ConfigError(InputError):
    """A config file that cannot be used; the message lists every problem found."""


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cluster: ClusterSpec
    model: ModelSpec
    cost: CostSpec
    planner: PlannerSpec = Field(default_factory=PlannerSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)


class RLJobConfig(BaseModel):
    """An RL post-training job (`pliant rl`): the policy model, the task, the algorithm and
    dataflow, the learner group's engine and the Ray resources."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: ModelSpec
    task: TaskSpec = Field(default_factory=CopyTaskSpec)
    rl: RLSpec = Field(default_factory=RLSpec)
    learner: LearnerSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    faults: FaultSpec = Field(default_factory=FaultSpec)  # faults.max_restarts bounds the learner's restarts


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the name of a bundled config (`flexsp-7b-64gpu`, `local-cpu`)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = resources.files("pliant.configs").joinpath(f"{stem}.yaml")
    if bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"config {name}: no such file (and no bundled config named {stem!r})")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif kind == "missing":
            lines.append(f"  {loc}: missing (required)")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            if isinstance(value, dict):  # a check across the keys of a section
                lines.append(f"  {loc}: {msg}")
            else:
                lines.append(f"  {loc} = {_describe(value)}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config", schema: type[BaseModel] | None = None) -> Any:
    """Validate a config mapping against `schema` (default: the training job's, JobConfig)."""
    schema = schema or JobConfig
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(schema.model_fields)}), "
                          f"got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def _read_yaml(name: str | Path) -> tuple[Path, Any]:
    path = resolve_config_path(name)
    try:
        return path, yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def is_table(value: Any) -> bool:
    """A mapping keyed by numbers (e.g. bandwidth by group size): a value, not a section."""
    return isinstance(value, dict) and bool(value) and all(isinstance(k, (int, float)) for k in value)


def merge_config(base: dict, overlay: dict) -> dict:
    """`overlay` on top of `base`, key by key: sections merge; anything else, tables keyed by
    numbers included, replaces (an overlay's bandwidth table for a smaller world must not keep
    the base table's larger group sizes)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not is_table(value) \
                and not is_table(out[key]):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def load_config(names: str | Path | Sequence[str | Path], schema: type[BaseModel] | None = None) -> Any:
    """One config file, or several merged in order (later files override earlier ones key by
    key, e.g. a base config and the coefficients `pliant profile` wrote)."""
    names = [names] if isinstance(names, (str, Path)) else list(names)
    if not names:
        raise ConfigError("no config file given")
    data: Any = None
    sources = []
    for name in names:
        path, layer = _read_yaml(name)
        sources.append(str(path))
        if data is None:
            data = layer
        elif not isinstance(layer, dict) or not isinstance(data, dict):
            raise ConfigError(f"{path}: an overlay config must be a mapping of sections, got "
                              f"{type(layer).__name__}")
        else:
            data = merge_config(data, layer)
    return parse_config(data, " + ".join(sources), schema)


def with_overrides(cfg: JobConfig, section: str, **values: Any) -> JobConfig:
    """A copy of `cfg` with some keys of one section replaced (None leaves a key as it is),
    validated like the file was: an override gets the same error messages."""
    changes = {k: v for k, v in values.items() if v is not None}
    if not changes:
        return cfg
    data = cfg.model_dump()
    data[section].update(changes)
    return parse_config(data, "command line")
