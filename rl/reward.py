"""Reward functions: what a user hands over to score a response.

A reward function takes one `RewardSample` and returns a float:

    def reward(sample: RewardSample) -> float:
        return 1.0 if sample.response.strip() == sample.row["answer"] else 0.0

`rl.reward_fn` names it as `module:function` (an importable module, e.g.
`pliant.rl.arithmetic:reward`) or `path/to/file.py:function` (a file anywhere, e.g.
`examples/arithmetic_reward.py:reward`). The task builds the sample (rl/task.py,
`Task.reward_sample`): the prompt's text before any chat template, the response decoded
with the stop and special tokens dropped, both as token ids too, and the dataset row as read,
so a checker can compare against any column of the user's data.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .spec import RLConfigError


@dataclass(frozen=True)
class RewardSample:
    prompt: str  # the prompt's text (the row's prompt_key value, before any chat template)
    response: str  # the generated text, stop and special tokens dropped
    response_ids: list[int]  # the generated ids, the stop token included when one was generated
    row: dict  # the dataset row as read (the copy task: {"digits": "0412"})
    prompt_ids: list[int]  # the prompt's ids as the policy read them


RewardFn = Callable[[RewardSample], float]


class FunctionLoadError(RLConfigError):
    """A function named by a config key (`module:function` or `file.py:function`) that cannot be
    loaded: the message names the key, the path and why."""


class RewardFnError(FunctionLoadError):
    """A reward function (rl.reward_fn) that cannot be loaded."""


def _import_file(path: Path) -> Any:
    """The module of a .py file outside any package, under a name of its own (registered in
    sys.modules while it runs, as dataclasses and pickle by reference need)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"pliant_reward_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def split_function_path(path: str) -> tuple[str, str, bool]:
    """(target, function name, whether the target is a file) of `module:function` or
    `path/to/file.py:function`; target or name is empty when the path has no such form."""
    target, sep, name = path.rpartition(":")
    if not sep:
        return "", "", False
    return target, name, target.endswith(".py") or "/" in target or "\\" in target


def load_function(path: str, key: str, error: type[FunctionLoadError] = FunctionLoadError) -> Callable[..., Any]:
    """The callable `path` names: `module:function` (an importable module) or
    `path/to/file.py:function` (a file anywhere, relative to the working directory).

    Raises `error` naming `key` (the config key it came from), the path and the cause
    when the module or file cannot be imported (the import's own error quoted), has no such
    attribute, or the attribute is not callable."""
    target, name, is_file = split_function_path(path)
    if not target or not name:
        raise error(f"{key}={path!r}: expected 'module:function' or 'path/to/file.py:function'")
    where = f"file {target}" if is_file else f"module {target}"
    try:
        if is_file:
            file = Path(target)
            if not file.is_file():
                raise error(f"{key}={path!r}: the file {target} does not exist (relative paths are from "
                                    f"{Path.cwd()})")
            module = _import_file(file)
        else:
            module = importlib.import_module(target)
    except error:
        raise
    except Exception as e:  # noqa: BLE001 (whatever the user's module raises while it is imported)
        raise error(f"{key}={path!r}: cannot import {where}: {type(e).__name__}: {e}") from e
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise error(f"{key}={path!r}: {where} has no attribute {name!r} (its functions: "
                            f"{', '.join(public) or 'none'})")
    fn = getattr(module, name)
    if not callable(fn):
        raise error(f"{key}={path!r}: {target}:{name} is a {type(fn).__name__}, not a function")
    return fn


def load_reward_fn(path: str, key: str = "rl.reward_fn") -> RewardFn:
    """The reward function `path` names (see load_function), checked to be callable as
    fn(sample): the signature of before RewardSample, fn(prompt, response), is an error."""
    fn = load_function(path, key, RewardFnError)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return fn
    try:
        sig.bind(object())
    except TypeError:
        target, _, name = path.rpartition(":")
        raise RewardFnError(f"{key}={path!r}: {target}:{name}{sig} cannot be called as fn(sample); a reward "
                            f"function takes one RewardSample (pliant.rl.reward) and returns a float") from None
    return fn
