"""Model-family adapters, selected from the class of the loaded diffusers pipeline."""

from __future__ import annotations

from ..errors import UserInputError
from .image_processors import use_pil_image_processors_without_torchvision

use_pil_image_processors_without_torchvision()  # before the adapters import diffusers' pipeline modules

from .base import Conditioning, DenoiserCall, FlowModelAdapter  # noqa: E402
from .flux import FluxAdapter  # noqa: E402
from .flux_kontext import FluxKontextAdapter  # noqa: E402
from .qwen_image import QwenImageAdapter  # noqa: E402
from .qwen_image_edit import QwenImageEditAdapter  # noqa: E402
from .sd3 import SD3Adapter  # noqa: E402
from .wan import WanAdapter  # noqa: E402

#: Adapters by family name: the ``model_family`` a recipe (or ``FlowGRPOTrainer(model_family=...)``) may force.
ADAPTERS: dict[str, type[FlowModelAdapter]] = {
    "sd3": SD3Adapter,
    "flux": FluxAdapter,
    "flux_kontext": FluxKontextAdapter,
    "qwen_image": QwenImageAdapter,
    "qwen_image_edit": QwenImageEditAdapter,
    "wan": WanAdapter,
}


def _supported() -> str:
    classes = ", ".join(sorted(name for cls in ADAPTERS.values() for name in cls.pipeline_class_names))
    return f"supported pipelines: {classes} (model_family: {', '.join(ADAPTERS)})"


def adapter_for_pipeline(pipeline, family: str | None = None, args=None) -> FlowModelAdapter:
    """The adapter for ``pipeline``: by ``family`` name if given, otherwise by the pipeline's class; configured from
    the run's config ``args`` when given (`FlowModelAdapter.configure`: a video family's frame count, ...).

    Automatic selection matches the pipeline's class name, or the name of one of its base classes, so a subclass of
    e.g. ``FluxPipeline`` is served by the FLUX adapter. Forcing a family skips the check, for pipelines whose class
    is unknown here but which follow that family's interface.
    """
    adapter = _select(pipeline, family)
    if args is not None:
        adapter.configure(args)
    return adapter


def _select(pipeline, family: str | None) -> FlowModelAdapter:
    if family is not None:
        if family not in ADAPTERS:
            raise UserInputError(f"Unknown model family {family!r}; {_supported()}.")
        return ADAPTERS[family](pipeline)
    for cls in type(pipeline).__mro__:
        for adapter_class in ADAPTERS.values():
            if cls.__name__ in adapter_class.pipeline_class_names:
                return adapter_class(pipeline)
    raise UserInputError(
        f"Pipeline class {type(pipeline).__name__} is not supported; {_supported()}. Set model_family to force one."
    )


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "DenoiserCall",
    "FlowModelAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "SD3Adapter",
    "WanAdapter",
    "adapter_for_pipeline",
]
