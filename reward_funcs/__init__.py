"""Built-in reward functions, addressed by name in recipes (`reward_funcs: [prompt_color]`).

The registry maps each name to a `"module:function"` path and imports the module only when the reward
is asked for, so importing this package stays cheap. Each function's `__name__` equals its registry
name, which TRL uses when logging `rewards/<name>/mean`.

The model-based rewards (`pickscore`, `clipscore`, `image_similarity`, `aesthetic`, `imagereward`, `hps`, `ocr`,
`geneval`, `vlm_judge`, `temporal_consistency`) are callable objects, not functions: importing their module loads
no model; the first call does, once per process (cached per model id, device and dtype). Each module also has a
`make_<name>(...)` factory for other settings (model path, device, dtype, batch size, ...).

Any image reward scores videos through `reward_funcs.frames.FramePooled` (`pickscore@frames` in a recipe).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from trl_flow.errors import UserInputError

__all__ = ["BUILTIN_REWARDS", "get_builtin_reward", "list_builtin_rewards"]

BUILTIN_REWARDS: dict[str, str] = {
    # rule-based (numpy + Pillow)
    "brightness": "reward_funcs.rules:brightness",
    "color_transition": "reward_funcs.video_rules:color_transition",
    "jpeg_compressibility": "reward_funcs.rules:jpeg_compressibility",
    "jpeg_incompressibility": "reward_funcs.rules:jpeg_incompressibility",
    "mini_geneval": "reward_funcs.mini_geneval:mini_geneval",
    "mid_grey": "reward_funcs.rules:mid_grey",
    "prompt_color": "reward_funcs.rules:prompt_color",
    # video (lists of frames): frame change in numpy; CLIP similarity of consecutive frames
    "motion": "reward_funcs.video:motion",
    "temporal_consistency": "reward_funcs.video:temporal_consistency",
    # image editing: read the sample's source image (`source_images`)
    "recolor_shape": "reward_funcs.edit_rules:recolor_shape",
    # model-based: each module's object loads its model on first call (see docs/rewards.md)
    "aesthetic": "reward_funcs.aesthetic:aesthetic",
    "clipscore": "reward_funcs.clipscore:clipscore",
    "geneval": "reward_funcs.geneval:geneval",
    "hps": "reward_funcs.hps:hps",
    "image_similarity": "reward_funcs.image_similarity:image_similarity",
    "imagereward": "reward_funcs.imagereward:imagereward",
    "ocr": "reward_funcs.ocr:ocr",
    "pickscore": "reward_funcs.pickscore:pickscore",
    "vlm_judge": "reward_funcs.vlm_judge:vlm_judge",
}
"""Built-in reward name -> `"module:function"` import path."""


def list_builtin_rewards() -> list[str]:
    """Names of the built-in rewards, sorted."""
    return sorted(BUILTIN_REWARDS)


def get_builtin_reward(name: str) -> Callable[..., Any]:
    """Import and return the built-in reward function called `name`.

    Raises:
        UserInputError: `name` is not a built-in reward.
    """
    target = BUILTIN_REWARDS.get(name)
    if target is None:
        raise UserInputError(
            f"unknown built-in reward '{name}'; built-in rewards are: {', '.join(list_builtin_rewards())}."
        )
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
