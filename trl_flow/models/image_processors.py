"""Pick transformers' PIL image processors when torchvision is absent, before diffusers imports its pipelines.

diffusers' pipeline modules import ``CLIPImageProcessor`` / ``SiglipImageProcessor`` (for IP-adapters and safety
checkers a flow-matching run never uses). Without torchvision, transformers then falls back to the PIL classes and
prints a warning for each, on every start. Binding the names to the PIL classes up front is the same choice made
explicitly, so nothing is printed and nothing else changes.
"""

from __future__ import annotations

import importlib.util

#: transformers names that diffusers' pipelines import, and their PIL (torchvision-free) classes.
PIL_IMAGE_PROCESSORS = {
    "CLIPImageProcessor": "CLIPImageProcessorPil",
    "SiglipImageProcessor": "SiglipImageProcessorPil",
}


def use_pil_image_processors_without_torchvision() -> None:
    """Without torchvision, make ``from transformers import CLIPImageProcessor`` (etc.) give the PIL class."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    import transformers

    for name, pil_name in PIL_IMAGE_PROCESSORS.items():
        if name in vars(transformers):  # already resolved by an earlier import: nothing left to choose
            continue
        try:
            pil_class = getattr(transformers, pil_name)
        except AttributeError:  # a transformers without the split processors: it has no fallback to warn about
            continue
        setattr(transformers, name, pil_class)
