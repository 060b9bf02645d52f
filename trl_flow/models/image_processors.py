"""Pick transformers' PIL image processors when torchvision is absent, before diffusers imports its pipelines.

diffusers' pipeline modules import ``CLIPImageProcessor`` / ``SiglipImageProcessor`` (for IP-adapters and safety
checkers a flow-matching run never uses). Without torchvision, transformers then falls back to the PIL classes and
prints a warning for each, on every start. Binding the names to the PIL classes up front is the same choice made
explicitly, so nothing is printed and nothing else changes.

The Qwen2-VL processor of the Qwen-Image-Edit pipelines is the other torchvision casualty: transformers >= 5 cannot
build it without its (torchvision-only) video processor. :func:`qwen2vl_processor_without_torchvision` loads it
without that part for :func:`trl_flow.models.loading.load_pipeline`, and :func:`qwen2vl_image_processor` builds one
(the tiny offline Qwen-Image-Edit).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

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


@functools.cache
def _image_only_qwen2vl_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without its video processor, which needs torchvision (transformers >= 5 refuses to
        build the processor without one). Image prompts, all an edit pipeline sends, are processed as by the full
        class; it saves as ``Qwen2VLProcessor`` so the folder stays a standard one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict:
            return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    return ImageOnlyQwen2VLProcessor


def qwen2vl_image_processor(image_processor, tokenizer):
    """A Qwen2-VL processor of ``image_processor`` and ``tokenizer`` that works with or without torchvision (see
    :func:`_image_only_qwen2vl_processor_class`)."""
    return _image_only_qwen2vl_processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def qwen2vl_processor_without_torchvision(name_or_path: str) -> dict:
    """``{"processor": ...}`` to pass to ``from_pretrained`` for a pipeline whose ``processor`` is a
    ``Qwen2VLProcessor`` (Qwen-Image-Edit), when torchvision is absent and transformers could not build it; ``{}``
    otherwise (torchvision present, another pipeline, or a folder/hub id that cannot be read: then the pipeline's
    own loading reports the problem)."""
    if importlib.util.find_spec("torchvision") is not None:
        return {}
    local = pathlib.Path(name_or_path).is_dir()
    try:
        if local:
            index_file = pathlib.Path(name_or_path) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index_file = pathlib.Path(hf_hub_download(name_or_path, "model_index.json"))
        index = json.loads(index_file.read_text())
        if list(index.get("processor") or []) != ["transformers", "Qwen2VLProcessor"]:
            return {}
        folder = pathlib.Path(name_or_path)
        if not local:
            from huggingface_hub import snapshot_download

            folder = pathlib.Path(snapshot_download(name_or_path, allow_patterns=["processor/*"]))
    except Exception:  # unreadable here: from_pretrained will say why
        return {}
    return {"processor": _image_only_qwen2vl_processor_class().from_pretrained(folder / "processor")}
