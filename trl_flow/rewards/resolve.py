"""Turn the `reward_funcs` entries of a recipe into callables, and check what those callables return.

A reward spec is one of:

- a callable, kept as is;
- a built-in reward name (see `reward_funcs.list_builtin_rewards()`), e.g. `prompt_color`;
- an import path `package.module:function`, e.g. `reward_funcs.rules:brightness`;
- a Python file and a function in it, `path/to/file.py:function` (relative paths are relative to `base_dir`,
  by default the current directory). The file is imported under a module name derived from its absolute path,
  so the same file always yields the same module. Its folder is not added to `sys.path`.
- the URL of a reward server, `http://host:port/NAME` (or `https://...`), as printed by
  `trl-flow serve-reward NAME`: the reward is computed by that server (see `trl_flow.rewards.remote.remote_reward`).
- any of these followed by `@frames` or `@frames(every=K,pool=mean|min|max|first,chunk=N)`: the image reward
  applied to videos, scoring every K-th frame and pooling the scores per video (`reward_funcs.frames.FramePooled`).

If the named attribute is a class, it is instantiated without arguments and the instance must be
callable (handy for rewards that load a model once).

[`call_reward_func`] runs one reward function the way TRL does (keyword arguments `prompts`,
`completions`, plus extras) and turns any exception, or a return [`validate_rewards`] rejects, into a
[`UserInputError`] naming the function as the recipe spelled it (`my_rewards.py:r`, see [`reward_func_label`]);
[`validate_rewards`] checks the returned values and converts them. Metrics keep the function's `__name__`
([`reward_func_name`]), as in TRL.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reward_funcs import BUILTIN_REWARDS, get_builtin_reward, list_builtin_rewards
from reward_funcs.frames import POOLS, FramePooled
from trl_flow.errors import UserInputError
from trl_flow.rewards.remote import remote_reward

__all__ = [
    "call_reward_func",
    "resolve_reward_func",
    "resolve_reward_funcs",
    "reward_func_label",
    "reward_func_name",
    "validate_rewards",
]

_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# `SPEC@word` or `SPEC@word(options)` at the end of a spec; a URL's `user@host:port/...` never matches (no `:` or
# `/` may follow the word).
_MODIFIER = re.compile(r"^(?P<base>.*)@(?P<word>[A-Za-z_]\w*)\s*(?:\((?P<options>[^()]*)\))?$")
_FRAMES_FORM = f"'SPEC@frames' or 'SPEC@frames(every=K,pool={'|'.join(POOLS)},chunk=N)'"


def _forms_hint() -> str:
    return (
        f"Use a built-in reward ({', '.join(list_builtin_rewards())}), an import path "
        "'package.module:function', a file 'path/to/file.py:function', or a reward server "
        "'http://host:port/NAME'."
    )


def reward_func_name(func: Callable[..., Any]) -> str:
    """The name TRL logs a reward under: `__name__` (through `functools.partial`), else the class name."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


_SPELLINGS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
"""Resolved reward callable -> the spec it was last resolved from, for error messages."""


def reward_func_label(func: Callable[..., Any]) -> str:
    """How errors name a reward: the spec it was resolved from (`my_rewards.py:r`, `http://host:8765/r`), as the
    recipe spelled it; a callable given as such (or one that cannot be weakly referenced) by [`reward_func_name`].

    A callable resolved from several specs (the same function through two paths) is named by the latest.
    """
    try:
        return _SPELLINGS.get(func) or reward_func_name(func)
    except TypeError:  # not weakly referenceable
        return reward_func_name(func)


def resolve_reward_funcs(
    specs: str | Callable[..., Any] | Sequence[str | Callable[..., Any]],
    base_dir: str | os.PathLike[str] | None = None,
) -> list[Callable[..., Any]]:
    """Resolve reward specs (see the module docstring) into a list of callables, in order.

    Args:
        specs: one spec or a list of specs.
        base_dir: folder that relative `file.py:function` paths are relative to (e.g. the recipe's folder);
            defaults to the current working directory.

    Raises:
        UserInputError: empty list, unknown name, module not importable, file missing or failing to import,
            attribute missing, or not callable.
    """
    if isinstance(specs, str) or callable(specs):
        specs = [specs]
    if not isinstance(specs, Sequence):
        raise UserInputError(
            f"reward_funcs must be a reward name / path or a list of them, got {type(specs).__name__}. " + _forms_hint()
        )
    if len(specs) == 0:
        raise UserInputError("reward_funcs is empty; give at least one reward. " + _forms_hint())
    return [resolve_reward_func(spec, base_dir=base_dir) for spec in specs]


def resolve_reward_func(
    spec: str | Callable[..., Any], base_dir: str | os.PathLike[str] | None = None
) -> Callable[..., Any]:
    """Resolve a single reward spec into a callable; see [`resolve_reward_funcs`]."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise UserInputError(
            f"reward_funcs entry {spec!r} is a {type(spec).__name__}, not a name or path. " + _forms_hint()
        )
    spec = spec.strip()
    func = _resolve_spec(spec, base_dir)
    try:
        _SPELLINGS[func] = spec
    except TypeError:  # not weakly referenceable: errors name it by reward_func_name
        pass
    return func


def _frames_options(spec: str, text: str) -> dict[str, Any]:
    """The keyword arguments of `FramePooled` written in `@frames(...)`."""
    options: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, equals, value = (piece.strip() for piece in item.partition("="))
        if not equals or not key or not value:
            raise UserInputError(f"reward '{spec}': option '{item}' of @frames is not KEY=VALUE; write {_FRAMES_FORM}.")
        if key in options:
            raise UserInputError(f"reward '{spec}': option '{key}' of @frames is given twice.")
        if key in ("every", "chunk"):
            if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
                raise UserInputError(
                    f"reward '{spec}': @frames option {key} must be a positive integer, got '{value}'."
                )
            options[key] = int(value)
        elif key == "pool":
            if value not in POOLS:
                raise UserInputError(
                    f"reward '{spec}': @frames option pool must be one of {', '.join(POOLS)}, got '{value}'."
                )
            options[key] = value
        else:
            raise UserInputError(
                f"reward '{spec}': unknown @frames option '{key}' (options: every, pool, chunk); write {_FRAMES_FORM}."
            )
    return options


def _resolve_spec(spec: str, base_dir: str | os.PathLike[str] | None) -> Callable[..., Any]:
    modifier = _MODIFIER.match(spec)
    if modifier is not None:
        base, word = modifier["base"].strip(), modifier["word"]
        if word != "frames":
            raise UserInputError(
                f"reward '{spec}': unknown modifier '@{word}'; the only one is '@frames' ({_FRAMES_FORM})."
            )
        if not base:
            raise UserInputError(f"reward '{spec}': nothing before '@frames'; write {_FRAMES_FORM}.")
        options = _frames_options(spec, modifier["options"] or "")
        inner = _resolve_spec(base, base_dir)
        written = ",".join(f"{key}={value}" for key, value in options.items())
        name = f"{reward_func_name(inner)}@frames" + (f"({written})" if written else "")
        return FramePooled(inner, **options, name=name)
    if "@frames" in spec:
        raise UserInputError(f"reward '{spec}' is malformed; write {_FRAMES_FORM}.")
    if spec.startswith(("http://", "https://")):
        return remote_reward(spec)
    if spec in BUILTIN_REWARDS:
        return get_builtin_reward(spec)
    if ":" not in spec:
        if spec.endswith(".py"):
            raise UserInputError(f"reward '{spec}' names a file but no function; write it as '{spec}:function_name'.")
        close = difflib.get_close_matches(spec, list_builtin_rewards(), n=1)
        suggestion = f" Did you mean '{close[0]}'?" if close else ""
        if not close and "." in spec and _MODULE_PATH.match(spec):
            module_part, _, func_part = spec.rpartition(".")
            suggestion = f" Did you mean '{module_part}:{func_part}'?"
        raise UserInputError(f"unknown reward '{spec}'.{suggestion} " + _forms_hint())

    location, _, attr = spec.rpartition(":")
    if not location or not attr:
        raise UserInputError(f"reward '{spec}' is malformed. " + _forms_hint())
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(location, spec, base_dir)
    else:
        module = _import_module(location, spec)

    if not hasattr(module, attr):
        public = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise UserInputError(
            f"reward '{spec}': '{location}' has no attribute '{attr}'"
            + (f" (callables there: {', '.join(public)})" if public else "")
            + ". Fix the function name after ':'."
        )
    func = getattr(module, attr)
    if inspect.isclass(func):
        try:
            func = func()
        except Exception as e:
            raise UserInputError(
                f"reward '{spec}' is a class; creating it with no arguments raised {type(e).__name__}: {e}"
            ) from e
    if not callable(func):
        raise UserInputError(
            f"reward '{spec}' is a {type(func).__name__}, not callable; point it at a function "
            "fn(prompts, completions, **kwargs) -> list[float | None]."
        )
    return func


def _import_module(module_name: str, spec: str) -> Any:
    if not _MODULE_PATH.match(module_name):
        raise UserInputError(f"reward '{spec}': '{module_name}' is not a valid Python module path. " + _forms_hint())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserInputError(
                f"reward '{spec}': module '{module_name}' could not be imported (no module named "
                f"'{e.name}'). Install it or put it on PYTHONPATH, or use 'path/to/file.py:function'."
            ) from e
        raise UserInputError(
            f"reward '{spec}': importing module '{module_name}' failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise UserInputError(
            f"reward '{spec}': importing module '{module_name}' failed: {type(e).__name__}: {e}"
        ) from e


def _import_file(location: str, spec: str, base_dir: str | os.PathLike[str] | None) -> Any:
    path = Path(os.path.expanduser(location))
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else os.getcwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise UserInputError(f"reward '{spec}': file '{path}' does not exist. Fix the path before ':'.")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"trl_flow_user_rewards.{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise UserInputError(f"reward '{spec}': cannot import '{path}' as a Python file; it must end in .py.")
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserInputError(f"reward '{spec}': importing file '{path}' failed: {type(e).__name__}: {e}") from e
    return module


def validate_rewards(func_name: str, values: Any, num_images: int) -> list[float]:
    """Check what a reward function returned and convert it to a list of floats, NaN where it returned None.

    Accepted: a list / tuple, or a 1-D numpy array / torch tensor, of exactly `num_images` entries, each
    a finite real number (bools and numpy / 0-d tensor scalars count) or None ("no reward for this
    image").

    Raises:
        UserInputError: naming `func_name` and the problem (not a sequence, wrong count, NaN / inf,
            non-number).
    """
    prefix = f"reward function '{func_name}'"
    if values is None:
        raise UserInputError(f"{prefix} returned None instead of a list of {num_images} rewards (missing return?).")
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        ndim = getattr(values, "ndim", 1)
        if ndim != 1:
            raise UserInputError(
                f"{prefix} returned a {ndim}-D {type(values).__name__} of shape {tuple(values.shape)}; "
                f"it must return one value per image, i.e. {num_images} values."
            )
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise UserInputError(
            f"{prefix} returned a {type(values).__name__}; it must return a list of {num_images} floats "
            "(or None for images it does not score)."
        )
    if len(values) != num_images:
        raise UserInputError(
            f"{prefix} returned {len(values)} values for {num_images} images; it must return exactly one "
            "value per image (None where it has no reward)."
        )
    result: list[float] = []
    for i, value in enumerate(values):
        if value is None:
            result.append(math.nan)
            continue
        if not isinstance(value, numbers.Real) and hasattr(value, "item"):
            try:
                value = value.item()  # one-element torch tensor / numpy array
            except Exception:
                pass  # reported as a non-number below
        if not isinstance(value, numbers.Real):
            raise UserInputError(
                f"{prefix} returned {type(value).__name__} {value!r} at index {i}; rewards must be numbers (or None)."
            )
        number = float(value)
        if math.isnan(number):
            raise UserInputError(f"{prefix} returned NaN at index {i}; return None for images it cannot score.")
        if math.isinf(number):
            raise UserInputError(f"{prefix} returned {number} at index {i}; rewards must be finite.")
        result.append(number)
    return result


def call_reward_func(
    func: Callable[..., Any], prompts: Sequence[Any], completions: Sequence[Any], /, **kwargs: Any
) -> Any:
    """Call `func(prompts=prompts, completions=completions, **kwargs)` as TRL does, check it, return its raw result.

    Coroutine functions (`async def`) are awaited in a fresh event loop. The result is checked with
    [`validate_rewards`] (one number or None per image) and returned unchanged; feed it to `validate_rewards` for
    floats. Errors name the function by [`reward_func_label`], i.e. as the recipe spelled it.

    Raises:
        UserInputError: naming the function, chained (`from`) to whatever exception it raised, or saying what is
            wrong with what it returned.
    """
    return call_reward_func_named(reward_func_label(func), func, prompts, completions, **kwargs)


def validated_reward_func(func: Callable[..., Any], adapter: Any = None) -> Callable[..., list[float]]:
    """``func`` wrapped the way the trainer calls it: a crash, a wrong count or a NaN is a clear error, never a silent
    0; for a video family, the call also gets the frame rate as ``fps`` (`trl_flow.video.reward_fps`)."""
    from trl_flow.video import reward_fps

    @functools.wraps(func)
    def reward(prompts: list[str], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        fps = reward_fps(adapter, completions)
        if fps is not None:
            kwargs.setdefault("fps", fps)
        values = call_reward_func(func, prompts, completions, **kwargs)
        return validate_rewards(reward_func_label(func), values, len(completions))

    return reward


def call_reward_func_named(
    name: str, func: Callable[..., Any], prompts: Sequence[Any], completions: Sequence[Any], /, **kwargs: Any
) -> Any:
    """[`call_reward_func`], with errors naming the function `name` (e.g. a reward server's served name)."""
    try:
        result = func(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except Exception as e:
        raise UserInputError(f"reward function '{name}' raised {type(e).__name__}: {e}") from e
    validate_rewards(name, result, len(completions))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable
