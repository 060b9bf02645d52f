"""Qwen-Image through the one adapter interface: pipeline parity (true CFG, masks), training, LoRA round trip."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from tests.factories import prompt_color_before_and_after_training, tiny_trainer
from trl_flow.models import QwenImageAdapter

# Prompts of different token lengths: the shorter one's embeddings are padded and masked.
PROMPTS = ["a red image", "something very dark blue"]
NEGATIVE = " "


@pytest.fixture(scope="module")
def tiny_qwen_image_path():
    from trl_flow.offline_models.qwen_image import ensure_tiny_qwen_image

    return ensure_tiny_qwen_image()


def make_trainer(model_path, tmp_path, reward_funcs=("prompt_color",), **overrides):
    settings = {"guidance_scale": 4.0, "negative_prompt": NEGATIVE, **overrides}
    targets = QwenImageAdapter.default_lora_target_modules
    return tiny_trainer(model_path, tmp_path / "out", targets, reward_funcs=reward_funcs, **settings)


def pipeline_images(pipe, true_cfg_scale, seed=3, steps=5, height=32, width=32):
    return pipe(
        PROMPTS,
        negative_prompt=[NEGATIVE] * len(PROMPTS) if true_cfg_scale > 1 else None,
        true_cfg_scale=true_cfg_scale,
        num_inference_steps=steps,
        height=height,
        width=width,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
    ).images


def assert_same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tiny_tokenizer_keeps_the_prompt_after_the_template(tiny_qwen_image_path):
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_path)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_conditioning_is_batch_first_and_padded_to_one_length(tiny_qwen_image_path, tmp_path):
    trainer = make_trainer(tiny_qwen_image_path, tmp_path)
    conditioning = trainer.adapter.encode_prompts(PROMPTS, NEGATIVE, 4.0, 16)
    assert set(conditioning) == {
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    }
    lengths = {tensor.shape[1] for tensor in conditioning.values()}
    assert len(lengths) == 1 and all(tensor.shape[0] == 2 for tensor in conditioning.values())
    mask = conditioning["prompt_embeds_mask"]
    assert mask[0].sum() < mask[1].sum()  # the shorter prompt is masked, not truncated or mixed up
    assert not conditioning["prompt_embeds"][0, int(mask[0].sum()) :].any()
    assert "negative_prompt_embeds" not in trainer.adapter.encode_prompts(PROMPTS, NEGATIVE, 1.0, 16)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_noise_level_zero_rollout_reproduces_qwen_image_pipeline(tiny_qwen_image_path, tmp_path, guidance_scale):
    trainer = make_trainer(tiny_qwen_image_path, tmp_path, guidance_scale=guidance_scale)
    ours = trainer.generate_images(PROMPTS, num_inference_steps=5, noise_level=0.0, seed=3)
    theirs = pipeline_images(QwenImagePipeline.from_pretrained(tiny_qwen_image_path), guidance_scale)
    assert_same_images(ours, theirs)


def test_non_square_rollout_reproduces_qwen_image_pipeline(tiny_qwen_image_path, tmp_path):
    trainer = make_trainer(tiny_qwen_image_path, tmp_path, height=32, width=48)
    ours = trainer.generate_images(PROMPTS, num_inference_steps=4, noise_level=0.0, seed=5)
    theirs = pipeline_images(QwenImagePipeline.from_pretrained(tiny_qwen_image_path), 4.0, seed=5, steps=4, width=48)
    assert ours[0].size == (48, 32)
    assert_same_images(ours, theirs)


def test_first_iteration_is_on_policy_with_true_cfg(tiny_qwen_image_path, tmp_path):
    trainer = make_trainer(
        tiny_qwen_image_path, tmp_path, max_steps=1, steps_per_generation=1, per_device_train_batch_size=16, beta=0.5
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert logs[0]["ratio/max_abs_deviation"] == 0.0
    assert logs[0]["kl"] == 0.0


def test_learns_a_prompt_conditional_reward(tiny_qwen_image_path, tmp_path):
    """As the SD3/FLUX tests: `prompt_color` averages to 0 over the balanced red/green/blue prompts for any fixed image,
    so the mean reward rises only if the policy follows the prompt. In Qwen-Image the prompt reaches the image tokens
    only through joint attention (there is no pooled-text modulation), so this checks that path end to end.

    It trains as Qwen-Image runs, with true CFG (scale 4, negative prompt " "), which scales the prompt-dependent part
    of the velocity, LoRA updates included, by about 4. At 16x16 pixels (4 image tokens beside ~9 text tokens, instead
    of 16 at 32x32) the prompt's share of the image tokens' attention is larger; 4 denoising steps keep the cost down.
    Measured on 2 CPU cores (one torch thread): 0.009 -> 0.188 (standard error 0.012, 15.0 SE) in 150 updates, ~18 s;
    training seeds 1 and 2 rose by 11.7 and 17.4 SE. The same run without CFG rose 3.0 SE; at 32x32 with 6 steps and no
    CFG, -0.3 SE in 200 updates (32x32 with CFG and 4 steps: 6.4, 44.7 and 40.5 SE for seeds 0-2, ~35 s).
    """
    trainer = make_trainer(tiny_qwen_image_path, tmp_path, max_steps=150, height=16, width=16, num_inference_steps=4)
    before, after, standard_error = prompt_color_before_and_after_training(trainer, 4)
    assert after - before > 3 * standard_error, (before, after, standard_error)


def test_saved_lora_loads_into_qwen_image_pipeline(tiny_qwen_image_path, tmp_path):
    trainer = make_trainer(tiny_qwen_image_path, tmp_path, max_steps=10, learning_rate=3e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    ours = trainer.generate_images(PROMPTS, num_inference_steps=5, noise_level=0.0, seed=3)

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_path)
    base = pipeline_images(pipe, 4.0)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipeline_images(pipe, 4.0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(theirs, base, strict=True))
    assert_same_images(ours, theirs)
