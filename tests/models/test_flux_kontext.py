"""FLUX.1 Kontext through the adapter interface: pipeline parity with a source image, the source encoded once per
(prompt, image) group, the source reaching the rewards, LoRA round trip (tiny offline Kontext)."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from tests.factories import tiny_trainer
from trl_flow.data import SOURCE_IMAGES_COLUMN
from trl_flow.models import FluxKontextAdapter
from trl_flow.models.flux_kontext import kontext_condition_ids

# As the tiny FLUX tests: the official attention targets plus the AdaLN modulations.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "norm1.linear", "norm.linear"]
PROMPTS = ["make it red", "make it blue"]


@pytest.fixture(scope="module")
def tiny_kontext_path():
    from trl_flow.offline_models.flux_kontext import ensure_tiny_flux_kontext

    return ensure_tiny_flux_kontext()


def sources() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    square = Image.new("RGB", (32, 32), (0, 0, 0))
    square.paste((230, 230, 230), (8, 8, 24, 24))
    return [noise, square]


def edit_dataset(prompts=PROMPTS, images=None):
    import datasets

    return datasets.Dataset.from_dict({"prompt": list(prompts), "image": images or sources()})


def make_trainer(path, tmp_path, train_dataset=None, **overrides):
    settings = {"guidance_scale": 2.5, **overrides}
    dataset = train_dataset if train_dataset is not None else edit_dataset()
    return tiny_trainer(path, tmp_path / "out", LORA_TARGETS, train_dataset=dataset, **settings)


def kontext_images(pipe, images, seed=3, steps=4):
    return pipe(
        prompt=PROMPTS,
        image=images,
        num_inference_steps=steps,
        guidance_scale=2.5,
        height=32,
        width=32,
        max_area=32 * 32,
        _auto_resize=False,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
    ).images


def as_arrays(images):
    return [np.asarray(image) for image in images]


def test_condition_ids_offset_the_first_coordinate():
    ids = kontext_condition_ids(4, 6, "cpu", torch.float32)
    assert ids.shape == (2 * 3, 3) and (ids[:, 0] == 1).all()
    assert ids[:, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]


def test_noise_level_zero_rollout_reproduces_kontext_pipeline(tiny_kontext_path, tmp_path):
    trainer = make_trainer(tiny_kontext_path, tmp_path)
    assert isinstance(trainer.adapter, FluxKontextAdapter) and trainer.adapter.takes_condition_images
    ours = trainer.generate_images(PROMPTS, num_inference_steps=4, noise_level=0.0, seed=3, condition_images=sources())
    theirs = kontext_images(FluxKontextPipeline.from_pretrained(tiny_kontext_path), sources())
    assert all(np.array_equal(a, b) for a, b in zip(as_arrays(ours), as_arrays(theirs), strict=True))
    # the source reaches the output: swapping the two prompts' sources changes both images
    swapped = trainer.generate_images(
        PROMPTS, num_inference_steps=4, noise_level=0.0, seed=3, condition_images=sources()[::-1]
    )
    assert all(not np.array_equal(a, b) for a, b in zip(as_arrays(ours), as_arrays(swapped), strict=True))


def test_source_is_encoded_once_per_group_and_reaches_every_reward(tiny_kontext_path, tmp_path):
    # Two rows with the same prompt and different sources: two groups of 4 per generation batch, one batch per step.
    seen = []

    def records_sources(prompts, completions, source_images, **kwargs):
        seen.append([np.asarray(image).mean() for image in source_images])
        return [0.0] * len(completions)

    dataset = edit_dataset(prompts=["make it red", "make it red"])
    trainer = make_trainer(
        tiny_kontext_path,
        tmp_path,
        dataset,
        reward_funcs=[records_sources],
        max_steps=2,
        num_generations=4,
        steps_per_generation=1,
        num_inference_steps=3,
    )
    vae = trainer.pipeline.vae
    encoded, encode = [], vae.encode
    vae.encode = lambda pixels, *a, **k: (encoded.append(pixels.shape[0]), encode(pixels, *a, **k))[1]
    trainer.train()
    # 2 generation batches x 2 (prompt, source) groups: one VAE call per batch, one image per group
    assert encoded == [2, 2]
    means = {round(float(np.asarray(image).mean()), 3) for image in trainer.train_dataset[SOURCE_IMAGES_COLUMN]}
    assert len(means) == 2 and len(seen) == 2 and all(len(batch) == 8 for batch in seen)
    assert all({round(float(m), 3) for m in batch} == means for batch in seen)
    for batch in seen:  # TRL's sampler repeats a row: each group of 4 shares one source
        assert all(len({round(float(m), 3) for m in batch[g : g + 4]}) == 1 for g in (0, 4))


def test_saved_lora_loads_into_kontext_pipeline(tiny_kontext_path, tmp_path):
    trainer = make_trainer(
        tiny_kontext_path, tmp_path, max_steps=2, learning_rate=3e-2, steps_per_generation=1, num_inference_steps=3
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    ours = trainer.generate_images(PROMPTS, num_inference_steps=4, noise_level=0.0, seed=3, condition_images=sources())
    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_path)
    base = as_arrays(kontext_images(pipe, sources()))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = as_arrays(kontext_images(pipe, sources()))
    assert any(not np.array_equal(a, b) for a, b in zip(loaded, base, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(as_arrays(ours), loaded, strict=True))
