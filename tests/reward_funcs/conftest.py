"""Fixtures for the model-based reward tests: tiny random CLIP / OWL-ViT checkpoints built offline.

The checkpoints are saved with `save_pretrained` into temporary directories, and the rewards load them through
the same `from_pretrained` code path as a hub id. They are random, so the tests check plumbing (shapes, batching,
caching, errors) and the scoring formulas, not score quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest

IMAGE_SIZE = 32


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these tests' tiny models on one thread (restored afterwards).

    On a small, busy machine torch's thread pool costs far more than it gives for tensors this small (measured:
    a 32-wide linear layer took 12 ms with 2 threads under load, 15 us with 1).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_tokenizer(max_length: int):
    from trl_flow.offline_models.word_tokenizers import build_clip_tokenizer as _build_clip_tokenizer

    tokenizer = _build_clip_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _text_config(tokenizer, max_length: int, hidden: int = 32) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_config(hidden: int = 32) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random `CLIPModel` (projection dim 16) with a `CLIPProcessor`, saved like a hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _tiny_tokenizer(77)
    config = CLIPConfig(
        text_config=_text_config(tokenizer, 77),
        vision_config=_vision_config(),
        projection_dim=16,
        logit_scale_init_value=2.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _owl_checkpoint(path: Path, kind: str) -> Path:
    import torch
    import transformers

    tokenizer = _tiny_tokenizer(16)
    prefix = "OwlViT" if kind == "owlvit" else "Owlv2"
    config_class = getattr(transformers, f"{prefix}Config")
    config = config_class(text_config=_text_config(tokenizer, 16), vision_config=_vision_config(), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, f"{prefix}ForObjectDetection")(config)
    if kind == "owlvit":
        image_processor = transformers.OwlViTImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    else:
        image_processor = transformers.Owlv2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["owlvit", "owlv2"])
def tiny_owl_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random OWL-ViT / OWLv2 detector with its processor, saved like a hub checkpoint."""
    return _owl_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
