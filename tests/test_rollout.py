"""The rollout and algorithm seams on a toy video family: 5-D latents (B, C, F, H, W) and a source-image condition.

No pipeline is involved: a toy adapter whose denoiser is a small convolution, conditioned on a prompt embedding and
on a per-sample "source" latent, shows that every reduction, the record, the decode hand-off and the loss are written
for any latent rank and for extra conditioning.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from trl_flow.algorithms import FlowGRPO, conditioning_of
from trl_flow.models import FlowModelAdapter
from trl_flow.offload import FrozenModules
from trl_flow.rollout import RolloutSampler

FRAMES, CHANNELS, SIZE = 3, 2, 4


class ToyVideoDenoiser(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Conv3d(CHANNELS * 2, CHANNELS, kernel_size=1)
        self.text = torch.nn.Linear(4, CHANNELS)

    def forward(self, latents, sigma, prompt_embeds, source_latents):
        text = self.text(prompt_embeds)[:, :, None, None, None]
        return self.mix(torch.cat([latents, source_latents], dim=1)) * (1 + sigma[:, None, None, None, None]) + text


class ToyVideoAdapter(FlowModelAdapter):
    """A video family in miniature: latents (B, C, F, H, W), completions as lists of frames, a source image."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__(SimpleNamespace(transformer=denoiser))
        self.encoded_sources = 0

    def frozen_modules(self):
        return {}

    def encode_prompts(self, prompts, negative_prompt, guidance_scale, max_sequence_length):
        return {"prompt_embeds": torch.stack([torch.full((4,), float(len(p))) for p in prompts])}

    def encode_conditioning(self, prompts, negative_prompt, guidance_scale, max_sequence_length, condition_images=None):
        conditioning = self.encode_prompts(prompts, negative_prompt, guidance_scale, max_sequence_length)
        self.encoded_sources += len(condition_images)
        sources = [
            torch.full((CHANNELS, FRAMES, SIZE, SIZE), image.getpixel((0, 0))[0] / 255) for image in condition_images
        ]
        conditioning["source_latents"] = torch.stack(sources)
        return conditioning

    def prepare_latents(self, batch_size, height, width, generator):
        shape = (batch_size, CHANNELS, FRAMES, SIZE, SIZE)
        if isinstance(generator, list):
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        return torch.randn(shape, generator=generator)

    def sigmas(self, num_inference_steps, height, width):
        return torch.linspace(1.0, 0.0, num_inference_steps + 1)

    def predict_velocity(self, denoiser, latents, sigma, conditioning, guidance_scale):
        return denoiser(latents, sigma, conditioning["prompt_embeds"], conditioning["source_latents"])

    def decode_latents(self, latents):
        frames = ((latents[:, 0].clamp(-1, 1) + 1) * 127.5).to(torch.uint8)  # (B, F, H, W), first channel as grey
        return [[Image.fromarray(frame.numpy(), mode="L").convert("RGB") for frame in video] for video in frames]


def make_args(**overrides):
    values = dict(
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        num_trained_steps=3,
        noise_level=0.7,
        sde_type="flow_sde",
        guidance_scale=1.0,
        negative_prompt="",
        max_sequence_length=8,
        rollout_batch_size=None,
        prompts_per_step=None,
        seed=0,
        gradient_accumulation_steps=1,
        sde_window_size=0,
        sde_window_range=None,
        beta=0.1,
        epsilon=1e-3,
        epsilon_high=None,
        train_micro_batch_size=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    denoiser = ToyVideoDenoiser()
    adapter = ToyVideoAdapter(denoiser)
    args = make_args()
    sampler = RolloutSampler(adapter, args, FrozenModules({}, torch.device("cpu"), False, False), 0, lambda: (0, 0))
    prompts = ["red", "red", "blue sky", "blue sky"]
    sources = [Image.new("RGB", (2, 2), (value, 0, 0)) for value in (0, 0, 255, 255)]  # a group shares its source
    return SimpleNamespace(
        denoiser=denoiser, adapter=adapter, args=args, sampler=sampler, prompts=prompts, sources=sources
    )


def rollout(toy, **kwargs):
    @contextlib.contextmanager
    def denoiser_for_generation():
        yield toy.denoiser

    videos, batch, conditioning = toy.sampler.rollout(
        denoiser_for_generation, toy.prompts, 4, 0.7, range(3), seed=5, condition_images=toy.sources, **kwargs
    )
    batch.update({f"cond_{name}": tensor for name, tensor in conditioning.items()})
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return videos, batch


def test_a_five_dimensional_rollout_records_every_trained_step_and_decodes_frames(toy):
    videos, batch = rollout(toy)
    assert batch["latents"].shape == (4, 3, CHANNELS, FRAMES, SIZE, SIZE)
    assert batch["next_latents"].shape == batch["latents"].shape
    assert batch["old_log_probs"].shape == batch["sigmas"].shape == (4, 3)
    assert torch.isfinite(batch["old_log_probs"]).all()
    assert len(videos) == 4 and all(len(video) == FRAMES and video[0].size == (SIZE, SIZE) for video in videos)
    # the step's chain: each recorded next latent is the following step's input
    assert torch.equal(batch["next_latents"][:, 0], batch["latents"][:, 1])


def test_a_source_image_is_encoded_once_per_group_and_reaches_the_denoiser(toy):
    conditioning = toy.sampler.conditioning(toy.prompts, toy.sources)
    assert toy.adapter.encoded_sources == 2  # two (prompt, source) groups, not four samples
    assert torch.equal(conditioning["source_latents"][0], conditioning["source_latents"][1])
    assert not torch.equal(conditioning["source_latents"][1], conditioning["source_latents"][2])
    other_sources = [Image.new("RGB", (2, 2), (128, 0, 0))] * 4
    with_other = toy.sampler.conditioning(toy.prompts, other_sources)
    latents = torch.zeros(4, CHANNELS, FRAMES, SIZE, SIZE)
    velocity = toy.adapter.predict_velocity(toy.denoiser, latents, torch.ones(4), conditioning, 1.0)
    velocity_other = toy.adapter.predict_velocity(toy.denoiser, latents, torch.ones(4), with_other, 1.0)
    assert not torch.allclose(velocity, velocity_other)


def test_flow_grpo_on_five_dimensional_latents_is_on_policy_and_has_gradients(toy):
    _, batch = rollout(toy)
    algorithm = FlowGRPO(toy.args, toy.adapter)

    @contextlib.contextmanager
    def reference(model):
        with torch.no_grad():
            yield model

    accelerator = SimpleNamespace(gather=lambda t: t.reshape(1), backward=lambda loss: loss.backward())
    loss, metrics = algorithm.loss(toy.denoiser, batch, reference, accelerator, gradient_accumulation_steps=1)
    # On-policy: the rollout's and the training pass's log-probs agree up to float32 round-off of a mean over the
    # latent's 96 elements of terms of size ~1.
    assert metrics["ratio/max_abs_deviation"] < 1e-5
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-10)  # the reference is the policy itself
    loss.backward()
    gradients = [p.grad for p in toy.denoiser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)
    rescored = algorithm.rescore_step(toy.denoiser, batch, 1)
    assert rescored.mean.shape == (4, CHANNELS, FRAMES, SIZE, SIZE)
    assert conditioning_of(batch).keys() == {"prompt_embeds", "source_latents"}


def test_micro_batched_loss_equals_the_single_pass_on_five_dimensional_latents(toy):
    _, batch = rollout(toy)

    def loss_and_grads(micro_batch_size):
        toy.denoiser.zero_grad(set_to_none=True)
        algorithm = FlowGRPO(make_args(train_micro_batch_size=micro_batch_size), toy.adapter)
        accelerator = SimpleNamespace(
            gather=lambda t: t.reshape(1),
            backward=lambda loss: loss.backward(),
            no_sync=lambda m: contextlib.nullcontext(),
        )
        loss, _ = algorithm.loss(toy.denoiser, batch, lambda m: contextlib.nullcontext(m), accelerator, 1)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in toy.denoiser.parameters()]

    whole, whole_grads = loss_and_grads(None)
    parts, part_grads = loss_and_grads(1)
    # float32 sums of the same terms in another order: a few ulps of values of size ~1
    assert torch.allclose(whole, parts, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(whole_grads, part_grads, strict=True))


def test_antithetic_pairs_mirror_on_five_dimensional_latents(toy):
    _, batch = rollout(toy, antithetic=True)
    first, second = batch["latents"][0::2], batch["latents"][1::2]
    assert torch.equal(first[:, 0], second[:, 0])  # the same initial noise (and, here, the same conditioning)
    assert not torch.equal(batch["next_latents"][0, 0], batch["next_latents"][1, 0])
    # mirrored SDE noise: the pair's first steps sit symmetrically around the step's mean
    mean = FlowGRPO(toy.args, toy.adapter).rescore_step(toy.denoiser, batch, 0).mean
    midpoint = (batch["next_latents"][0::2, 0] + batch["next_latents"][1::2, 0]) / 2
    assert torch.allclose(midpoint, mean[0::2], atol=1e-6)
