"""Qwen-Image-Edit(-Plus) through the adapter interface and the rollout sampler: pipeline parity with the source
image (VAE condition tokens and VL prompt), one encoding per (prompt, image) group, on-policy log-probs, LoRA.

The pipelines resize every source to about 1024x1024 pixels (~16k condition tokens for the tiny 4x VAE, minutes per
step on a CPU); the adapter's ``condition_area`` is a parameter, and the reference pipelines are run with their
``calculate_dimensions`` (Edit) or area constants (Edit-Plus) patched to the same small area, their code otherwise
unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from trl_flow.algorithms import FlowGRPO
from trl_flow.errors import UserInputError
from trl_flow.models import QwenImageEditAdapter, adapter_for_pipeline
from trl_flow.models.loading import load_pipeline
from trl_flow.offload import FrozenModules
from trl_flow.policy import DiffusionPolicy
from trl_flow.rollout import RolloutSampler

SIZE = 32  # target and condition side (pixels)
AREA = SIZE * SIZE
NEGATIVE = " "
PROMPTS = ["make it red", "make it a blue circle"]


def sources():
    """Two different source images of one size: a green square on grey, a yellow disc on black."""
    square = np.full((SIZE, SIZE, 3), 90, np.uint8)
    square[8:24, 8:24] = (30, 200, 40)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = np.zeros((SIZE, SIZE, 3), np.uint8)
    disc[(yy - 16) ** 2 + (xx - 16) ** 2 < 81] = (230, 220, 20)
    return [Image.fromarray(square), Image.fromarray(disc)]


@pytest.fixture(scope="module")
def tiny_edit_path():
    from trl_flow.offline_models.qwen_image_edit import ensure_tiny_qwen_image_edit

    return ensure_tiny_qwen_image_edit()


@pytest.fixture
def small_pipeline_areas(monkeypatch):
    """The reference pipelines' condition areas set to ``AREA`` (see the module docstring)."""
    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda _, ratio: original(AREA, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", AREA)


def make_args(**overrides):
    values = dict(
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        num_trained_steps=2,
        noise_level=0.7,
        sde_type="flow_sde",
        guidance_scale=4.0,
        negative_prompt=NEGATIVE,
        max_sequence_length=64,
        rollout_batch_size=None,
        prompts_per_step=None,
        seed=0,
        gradient_accumulation_steps=1,
        sde_window_size=0,
        sde_window_range=None,
        beta=0.0,
        epsilon=1e-3,
        epsilon_high=None,
        train_micro_batch_size=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def make_sampler(pipe, **overrides):
    adapter = QwenImageEditAdapter(pipe, condition_area=AREA, prompt_image_area=AREA)
    args = make_args(**overrides)
    frozen = FrozenModules(adapter.frozen_modules(), torch.device("cpu"), False, False)
    sampler = RolloutSampler(adapter, args, frozen, 0, lambda: (0, 0))
    return SimpleNamespace(adapter=adapter, args=args, sampler=sampler, policy=DiffusionPolicy(adapter.denoiser))


def rollout(toy, prompts, images, noise_level, steps=3, trained=range(0), **kwargs):
    @contextlib.contextmanager
    def denoiser_for_generation():
        yield toy.policy

    return toy.sampler.rollout(
        denoiser_for_generation, prompts, steps, noise_level, trained, seed=7, condition_images=images, **kwargs
    )


def assert_same_images(ours, theirs, levels: int = 0):
    """Equal images, or, with ``levels``, no pixel more than that many 8-bit levels apart (another seed's noise moves
    the tiny edit's pixels by up to 218-245 levels)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert difference.max() <= levels, f"{(difference > levels).sum()} pixels differ, by up to {difference.max()}"


def test_tiny_edit_tokenizer_drops_exactly_the_system_prompt(tiny_edit_path):
    pipe = load_pipeline(str(tiny_edit_path))
    assert type(adapter_for_pipeline(pipe)) is QwenImageEditAdapter
    prefix = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


def test_the_processor_is_loaded_without_torchvision_only_for_a_qwen2vl_processor(tiny_edit_path, tmp_path):
    from trl_flow.models.image_processors import qwen2vl_processor_without_torchvision

    override = qwen2vl_processor_without_torchvision(str(tiny_edit_path))
    if importlib.util.find_spec("torchvision") is not None:  # transformers builds the full processor itself
        assert override == {}
    else:
        assert getattr(override["processor"], "video_processor", None) is None
        assert override["processor"].image_processor.merge_size == 2
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "QwenImagePipeline", "tokenizer": ["transformers", "x"]}'
    )
    assert qwen2vl_processor_without_torchvision(str(tmp_path)) == {}
    assert qwen2vl_processor_without_torchvision(str(tmp_path / "absent")) == {}


@pytest.fixture(scope="module")
def edit_pipe(tiny_edit_path):
    """One loaded tiny Qwen-Image-Edit for the tests that leave it unchanged."""
    return load_pipeline(str(tiny_edit_path))


def test_noise_level_zero_rollout_reproduces_the_edit_pipeline(edit_pipe, small_pipeline_areas):
    """With true CFG (the negative prompt also sees the source image)."""
    toy = make_sampler(edit_pipe)
    ours, _, conditioning = rollout(toy, PROMPTS, sources(), 0.0)
    theirs = toy.adapter.reference_images(
        PROMPTS, 3, 4.0, SIZE, SIZE, 64, seed=7, condition_images=sources(), negative_prompt=NEGATIVE
    )
    assert_same_images(ours, theirs)
    assert conditioning["image_latents"].shape == (2, 4, SIZE // 4, SIZE // 4)
    # The source matters: the other source gives another edit of the same prompt from the same noise.
    other, _, _ = rollout(toy, PROMPTS, sources()[::-1], 0.0)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(ours[0]))


def test_noise_level_zero_rollout_reproduces_the_edit_plus_pipeline(edit_pipe, small_pipeline_areas, monkeypatch):
    """Edit-Plus ("Picture 1:" prompt, one prompt per pipeline call) through the same adapter, without CFG; each image
    draws its noise from its own generator, as the one-prompt pipeline calls seeded ``seed + i``. With the
    transformer's ``zero_cond_t`` on (Edit-2511: condition tokens modulated at t=0, told apart by ``img_shapes``)."""
    for module in [edit_pipe.transformer, *edit_pipe.transformer.transformer_blocks]:
        monkeypatch.setattr(module, "zero_cond_t", True)
    plus = QwenImageEditPlusPipeline(**edit_pipe.components)
    toy = make_sampler(plus, guidance_scale=1.0)
    assert toy.adapter.plus and type(adapter_for_pipeline(plus)) is QwenImageEditAdapter
    ours, _, _ = rollout(toy, PROMPTS, sources(), 0.0, sample_offset=0)
    theirs = toy.adapter.reference_images(PROMPTS, 3, 1.0, SIZE, SIZE, 64, seed=7, condition_images=sources())
    # The pipeline runs one prompt per call and the rollout batches them: on some CPUs the batched matrix products
    # round differently (seen once in CI, never here), which can move a pixel by a level.
    assert_same_images(ours, theirs, levels=2)


def test_the_source_is_encoded_once_per_prompt_image_group(edit_pipe):
    """Four samples in two (prompt, image) groups: two images through the VAE encoder and two prompts (plus their
    two negatives) through the Qwen2.5-VL encoder; the prompt embeddings depend on the image."""
    toy = make_sampler(edit_pipe)
    counts = {"vae": 0, "text": 0}

    def count(name, batch_of):
        def hook(module, args, kwargs):
            counts[name] += batch_of(args, kwargs)

        return hook

    hooks = [
        edit_pipe.vae.encoder.register_forward_pre_hook(count("vae", lambda a, k: a[0].shape[0]), with_kwargs=True),
        edit_pipe.text_encoder.register_forward_pre_hook(
            count("text", lambda a, k: k["input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    square, disc = sources()
    try:
        conditioning = toy.sampler.conditioning([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [square, square, disc, disc])
    finally:
        for hook in hooks:
            hook.remove()
    assert counts == {"vae": 2, "text": 4}
    for name, tensor in conditioning.items():
        assert tensor.shape[0] == 4, name
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[2], tensor[3]), name
    assert not torch.equal(conditioning["image_latents"][1], conditioning["image_latents"][2])
    same_prompt = toy.adapter.encode_conditioning([PROMPTS[0]] * 2, NEGATIVE, 4.0, 64, condition_images=[square, disc])
    assert not torch.allclose(same_prompt["prompt_embeds"][0], same_prompt["prompt_embeds"][1])


def test_a_rollout_is_on_policy_for_the_training_pass(edit_pipe):
    """The training pass recomputes the rollout's log-probs from the stored conditioning (image latents included):
    ratio 1, and the loss has gradients."""
    toy = make_sampler(edit_pipe)
    _, batch, conditioning = rollout(toy, PROMPTS, sources(), 0.7, trained=range(2))
    batch.update({f"cond_{name}": tensor for name, tensor in conditioning.items()})
    batch["advantages"] = torch.tensor([1.0, -1.0])

    @contextlib.contextmanager
    def reference(model):
        with torch.no_grad():
            yield model

    accelerator = SimpleNamespace(gather=lambda t: t.reshape(1), backward=lambda loss: loss.backward())
    loss, metrics = FlowGRPO(toy.args, toy.adapter).loss(toy.policy, batch, reference, accelerator, 1)
    assert metrics["ratio/max_abs_deviation"] < 1e-5
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in toy.policy.parameters())
    toy.policy.zero_grad(set_to_none=True)


def test_saved_lora_loads_into_the_plain_edit_pipeline(tiny_edit_path, small_pipeline_areas, tmp_path):
    """A LoRA on the adapter's default targets, saved as the trainer saves it, loads with ``load_lora_weights`` into
    a plain pipeline, changes its edit, and reproduces the policy's own noise-level-0 rollout."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    pipe = load_pipeline(str(tiny_edit_path))
    toy = make_sampler(pipe)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(QwenImageEditAdapter.default_lora_target_modules))
    policy = get_peft_model(toy.policy, config)
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" LoRA: B is zero at init
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    toy.policy = policy
    ours, _, _ = rollout(toy, PROMPTS, sources(), 0.0)
    prefix = "base_model.model.denoiser."
    lora = {k[len(prefix) :]: v for k, v in get_peft_model_state_dict(policy).items() if k.startswith(prefix)}
    toy.adapter.save_lora_weights(str(tmp_path), lora, policy.peft_config["default"].to_dict())

    plain = load_pipeline(str(tiny_edit_path))
    assert type(plain) is QwenImageEditPipeline
    adapter = QwenImageEditAdapter(plain)
    edit = dict(prompts=PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE)
    base = adapter.reference_images(**edit, max_sequence_length=64, seed=7, condition_images=sources())
    plain.load_lora_weights(str(tmp_path))
    theirs = adapter.reference_images(**edit, max_sequence_length=64, seed=7, condition_images=sources())
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(theirs, base, strict=True))
    assert_same_images(ours, theirs)


def test_missing_or_mismatched_sources_are_user_errors(edit_pipe):
    adapter = QwenImageEditAdapter(edit_pipe, condition_area=4 * AREA)  # 64x64 for a square, 96x32 for 2:1
    with pytest.raises(UserInputError, match="source image"):
        adapter.encode_conditioning(PROMPTS, NEGATIVE, 4.0, 64)
    with pytest.raises(UserInputError, match="2 prompts but 1 source images"):
        adapter.encode_conditioning(PROMPTS, NEGATIVE, 4.0, 64, condition_images=sources()[:1])
    wide = Image.new("RGB", (2 * SIZE, SIZE))
    with pytest.raises(UserInputError, match="different condition sizes"):
        adapter.encode_conditioning(PROMPTS, NEGATIVE, 4.0, 64, condition_images=[sources()[0], wide])
