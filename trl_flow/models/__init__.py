"""Model-family adapters, selected from the class of the loaded diffusers pipeline."""

from __future__ import annotations

from ..errors import UserInputError
from .base import Conditioning, DenoiserCall, FlowModelAdapter
from .sd3 import SD3Adapter

ADAPTERS: dict[str, type[FlowModelAdapter]] = {"sd3": SD3Adapter}


def adapter_for_pipeline(pipeline, family: str | None = None) -> FlowModelAdapter:
    """The adapter for ``pipeline``: by ``family`` name if given, otherwise by the pipeline's class name."""
    if family is not None:
        if family not in ADAPTERS:
            raise UserInputError(f"Unknown model family {family!r}; supported: {', '.join(sorted(ADAPTERS))}.")
        return ADAPTERS[family](pipeline)
    class_name = type(pipeline).__name__
    for adapter_class in ADAPTERS.values():
        if class_name in adapter_class.pipeline_class_names:
            return adapter_class(pipeline)
    supported = sorted(name for cls in ADAPTERS.values() for name in cls.pipeline_class_names)
    raise UserInputError(f"Pipeline class {class_name} is not supported; supported: {', '.join(supported)}.")


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "DenoiserCall",
    "FlowModelAdapter",
    "SD3Adapter",
    "adapter_for_pipeline",
]
