"""Tests for trl_flow.rewards: resolving reward specs, validating returns, wrapping reward exceptions."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reward_funcs.rules as rules
from trl_flow.errors import UserInputError
from trl_flow.rewards import (
    call_reward_func,
    resolve_reward_func,
    resolve_reward_funcs,
    reward_func_label,
    reward_func_name,
    validate_rewards,
)

USER_REWARD_FILE = """
CONSTANT = 3


def fn(prompts, completions, **kwargs):
    return [float(len(p)) for p in prompts]


class Scorer:
    def __init__(self):
        self.offset = 10.0

    def __call__(self, prompts, completions, **kwargs):
        return [self.offset for _ in prompts]
"""


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(USER_REWARD_FILE)
    return path


# ---------------------------------------------------------------------------------------------- resolving


def test_resolve_builtin_name() -> None:
    assert resolve_reward_funcs(["prompt_color", "brightness"]) == [rules.prompt_color, rules.brightness]


def test_resolve_single_string_and_callable() -> None:
    def mine(prompts, completions, **kwargs):
        return [0.0] * len(prompts)

    assert resolve_reward_funcs("jpeg_compressibility") == [rules.jpeg_compressibility]
    assert resolve_reward_funcs(mine) == [mine]
    assert resolve_reward_funcs([mine, "brightness"]) == [mine, rules.brightness]


def test_resolve_module_path() -> None:
    assert resolve_reward_funcs(["reward_funcs.rules:brightness"]) == [rules.brightness]


def test_resolve_file_path(reward_file: Path) -> None:
    (func,) = resolve_reward_funcs([f"{reward_file}:fn"])
    assert func.__name__ == "fn"
    assert func(prompts=["ab", "abcd"], completions=[None, None]) == [2.0, 4.0]
    # the same file resolves to the same module, hence the same function object
    assert resolve_reward_func(f"{reward_file}:fn") is func


def test_resolve_relative_file_path(reward_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_reward_func("my_reward.py:fn", base_dir=reward_file.parent).__name__ == "fn"
    monkeypatch.chdir(reward_file.parent)
    assert resolve_reward_func("./my_reward.py:fn").__name__ == "fn"


def test_resolve_class_is_instantiated(reward_file: Path) -> None:
    scorer = resolve_reward_func(f"{reward_file}:Scorer")
    assert type(scorer).__name__ == "Scorer"
    assert scorer(prompts=["a"], completions=[None]) == [10.0]
    assert reward_func_name(scorer) == "Scorer"


def test_unknown_name_lists_the_forms() -> None:
    with pytest.raises(UserInputError) as info:
        resolve_reward_funcs(["no_such_reward"])
    message = str(info.value)
    assert "'no_such_reward'" in message
    for name in ("brightness", "prompt_color", "jpeg_compressibility", "jpeg_incompressibility"):
        assert name in message
    assert "package.module:function" in message
    assert "path/to/file.py:function" in message


def test_unknown_name_suggests_close_builtin() -> None:
    with pytest.raises(UserInputError, match="Did you mean 'prompt_color'"):
        resolve_reward_func("prompt_colour")


def test_dotted_path_suggests_colon_form() -> None:
    with pytest.raises(UserInputError, match="Did you mean 'reward_funcs.rules:brightness'"):
        resolve_reward_func("reward_funcs.rules.brightness")


def test_file_without_function() -> None:
    with pytest.raises(UserInputError, match=r"rewards\.py:function_name"):
        resolve_reward_func("rewards.py")


def test_module_not_importable() -> None:
    with pytest.raises(UserInputError, match="module 'no_such_pkg_xyz.sub' could not be imported") as info:
        resolve_reward_func("no_such_pkg_xyz.sub:fn")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_invalid_module_path() -> None:
    with pytest.raises(UserInputError, match="not a valid Python module path"):
        resolve_reward_func("not a module:fn")


def test_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(UserInputError, match="does not exist") as info:
        resolve_reward_func(f"{missing}:fn")
    assert str(missing) in str(info.value)


def test_file_failing_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken_reward.py"
    path.write_text("def fn(:\n")
    with pytest.raises(UserInputError, match=r"importing file .*broken_reward\.py.*SyntaxError"):
        resolve_reward_func(f"{path}:fn")
    path.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(UserInputError, match="RuntimeError: boom at import"):
        resolve_reward_func(f"{path}:fn")


def test_attribute_missing_lists_callables(reward_file: Path) -> None:
    with pytest.raises(UserInputError, match="has no attribute 'missing'") as info:
        resolve_reward_func(f"{reward_file}:missing")
    assert "Scorer, fn" in str(info.value)
    with pytest.raises(UserInputError, match="has no attribute 'nope'"):
        resolve_reward_func("reward_funcs.rules:nope")


def test_attribute_not_callable(reward_file: Path) -> None:
    with pytest.raises(UserInputError, match="is a int, not callable"):
        resolve_reward_func(f"{reward_file}:CONSTANT")
    with pytest.raises(UserInputError, match="not callable"):
        resolve_reward_func("reward_funcs.rules:COLOR_CHANNELS")


@pytest.mark.parametrize("specs", [[], [3], [None], 3.5])
def test_bad_spec_types(specs) -> None:
    with pytest.raises(UserInputError, match="reward"):
        resolve_reward_funcs(specs)


# --------------------------------------------------------------------------------------------- validating


def test_validate_converts_none_to_nan_and_numbers_to_float() -> None:
    values = validate_rewards("f", [1, None, np.float32(0.5), True], 4)
    assert values[0] == 1.0 and values[2] == 0.5 and values[3] == 1.0
    assert math.isnan(values[1])
    assert all(type(v) is float for v in values)


def test_validate_accepts_1d_array_and_tensor() -> None:
    assert validate_rewards("f", np.array([0.25, 0.5]), 2) == [0.25, 0.5]
    torch = pytest.importorskip("torch")
    assert validate_rewards("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    assert validate_rewards("f", [torch.tensor(3.0), np.array(4.0)], 2) == [3.0, 4.0]


def test_validate_wrong_count() -> None:
    with pytest.raises(UserInputError, match="reward function 'my_fn' returned 3 values for 8 images"):
        validate_rewards("my_fn", [0.0, 1.0, 2.0], 8)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ([0.0, float("nan")], "'my_fn' returned NaN at index 1"),
        ([float("inf"), 0.0], "'my_fn' returned inf at index 0"),
        ([0.0, -float("inf")], "'my_fn' returned -inf at index 1"),
        (np.array([0.0, np.nan]), "'my_fn' returned NaN at index 1"),
        ([0.0, "0.5"], "'my_fn' returned str '0.5' at index 1"),
        ([0.0, [1.0]], "'my_fn' returned list"),
        (None, "'my_fn' returned None instead of a list"),
        (0.5, "'my_fn' returned a float"),
        ("ab", "'my_fn' returned a str"),
        (np.zeros((2, 1)), "'my_fn' returned a 2-D ndarray"),
        ({"a": 1.0, "b": 2.0}, "'my_fn' returned a dict"),
    ],
)
def test_validate_rejects_bad_values(values, pattern: str) -> None:
    with pytest.raises(UserInputError, match=pattern):
        validate_rewards("my_fn", values, 2)


# ------------------------------------------------------------------------------------------------ calling


def test_call_reward_func_passes_keywords_and_returns_raw() -> None:
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [None, 1.0]

    image = Image.new("RGB", (4, 4))
    result = call_reward_func(reward, ["a", "b"], [image, image], tag=["x", "y"], trainer_state=None)
    assert result == [None, 1.0]
    assert seen["prompts"] == ["a", "b"] and seen["tag"] == ["x", "y"] and "trainer_state" in seen


def test_call_reward_func_wraps_exceptions() -> None:
    def exploding_reward(prompts, completions, **kwargs):
        raise ValueError("bad image size")

    with pytest.raises(UserInputError) as info:
        call_reward_func(exploding_reward, ["a"], [None])
    assert str(info.value) == "reward function 'exploding_reward' raised ValueError: bad image size"
    assert isinstance(info.value.__cause__, ValueError)


def test_call_reward_func_names_partials_and_wraps_type_errors() -> None:
    def scaled(prompts, completions, scale):  # does not accept **kwargs
        return [scale] * len(prompts)

    func = functools.partial(scaled, scale=2.0)
    assert call_reward_func(func, ["a"], [None]) == [2.0]
    with pytest.raises(UserInputError, match="reward function 'scaled' raised TypeError"):
        call_reward_func(func, ["a"], [None], trainer_state=None)


def test_call_reward_func_awaits_async_functions() -> None:
    async def async_reward(prompts, completions, **kwargs):
        return [0.5 for _ in prompts]

    async def async_failing(prompts, completions, **kwargs):
        raise KeyError("x")

    assert call_reward_func(async_reward, ["a", "b"], [None, None]) == [0.5, 0.5]
    with pytest.raises(UserInputError, match="'async_failing' raised KeyError"):
        call_reward_func(async_failing, ["a"], [None])


def test_builtin_rewards_pass_validation() -> None:
    images = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    prompts = ["a red image", "a cat"]
    results = {}
    for func in resolve_reward_funcs(["brightness", "prompt_color", "jpeg_compressibility"]):
        raw = call_reward_func(func, prompts, images, completion_ids=None, trainer_state=None, tag=["a", "b"])
        results[reward_func_name(func)] = validate_rewards(reward_func_name(func), raw, len(images))
    assert set(results) == {"brightness", "prompt_color", "jpeg_compressibility"}
    assert results["prompt_color"][0] == pytest.approx(1.0)
    assert math.isnan(results["prompt_color"][1])  # "a cat" names no colour -> None -> NaN
    assert results["brightness"] == pytest.approx([1 / 3, 1 / 3])


RECIPE_REWARDS = """
CALLS = []


def r(prompts, completions, **kwargs):
    CALLS.append(len(completions))
    if len(CALLS) == 1:
        raise RuntimeError("model not loaded")
    return [0.5]  # one value, whatever the batch
"""


def test_errors_name_the_reward_as_the_recipe_spelled_it(tmp_path: Path) -> None:
    (tmp_path / "my_rewards.py").write_text(RECIPE_REWARDS)
    (func,) = resolve_reward_funcs(["my_rewards.py:r"], base_dir=tmp_path)
    assert func.__name__ == reward_func_name(func) == "r"  # metrics keep the function's name, as in TRL
    assert reward_func_label(func) == "my_rewards.py:r"

    def as_the_trainer_does() -> list[float]:  # rewards.validated_reward_func: call, then validate by __name__
        return validate_rewards(func.__name__, call_reward_func(func, ["a", "b"], [None, None]), 2)

    with pytest.raises(UserInputError) as info:
        as_the_trainer_does()
    assert str(info.value) == "reward function 'my_rewards.py:r' raised RuntimeError: model not loaded"
    with pytest.raises(UserInputError, match=r"^reward function 'my_rewards\.py:r' returned 1 values for 2 images"):
        as_the_trainer_does()
    # a callable given as such, and a built-in name, are named by __name__
    assert reward_func_label(rules.brightness) == "brightness"
    assert reward_func_label(resolve_reward_func("prompt_color")) == "prompt_color"


def test_reward_modules_import_in_one_direction() -> None:
    """server -> resolve -> remote, counting imports inside functions and under TYPE_CHECKING: no circle."""
    import ast

    import trl_flow.rewards

    folder = Path(trl_flow.rewards.__file__).parent
    imported = {}
    for name in ("remote", "resolve", "server"):
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                found.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imported[name] = {
            m.rsplit(".", 1)[-1] for m in found if m.startswith(("trl_flow.rewards", ".")) and m not in (".", "..")
        } & {"remote", "resolve", "server", "rewards"}
    assert imported == {"remote": set(), "resolve": {"remote"}, "server": {"remote", "resolve"}}
