"""A toy video family through `FlowGRPOTrainer`: rewards get lists of frames and `fps` (synchronous and async reward
paths), and an evaluation writes the videos and frame strips into samples/.

The toy family: latents (B, 3, F, 4, 4) turned into F RGB frames, a 1x1x1 convolution as the denoiser. The tiny Wan
replaces it at merge; nothing here depends on the family beyond its adapter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_flow import video
from trl_flow.config import FlowGRPOConfig
from trl_flow.models import ADAPTERS, FlowModelAdapter
from trl_flow.trainer import FlowGRPOTrainer

FRAMES, SIZE, FPS = 5, 4, 12.0


class ToyVideoTransformer(torch.nn.Module):
    """Called as diffusers transformers are: keyword arguments, ``return_dict=False`` -> a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Conv3d(3, 3, kernel_size=1)
        self.text = torch.nn.Linear(4, 3)

    @property
    def dtype(self) -> torch.dtype:
        return self.mix.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mix.weight.device

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        text = self.text(encoder_hidden_states)[:, :, None, None, None]
        return (self.mix(hidden_states) * (1 + timestep[:, None, None, None, None]) + text,)


class ToyVideoAdapter(FlowModelAdapter):
    fps = FPS

    def frozen_modules(self):
        return {}

    def encode_prompts(self, prompts, negative_prompt, guidance_scale, max_sequence_length):
        return {"prompt_embeds": torch.stack([torch.full((4,), float(len(p)) / 10) for p in prompts])}

    def prepare_latents(self, batch_size, height, width, generator):
        shape = (1, 3, FRAMES, SIZE, SIZE)
        if isinstance(generator, list):
            return torch.cat([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((batch_size, *shape[1:]), generator=generator)

    def sigmas(self, num_inference_steps, height, width):
        return torch.linspace(1.0, 0.0, num_inference_steps + 1)

    def predict_velocity(self, denoiser, latents, sigma, conditioning, guidance_scale):
        return denoiser(hidden_states=latents, timestep=sigma, encoder_hidden_states=conditioning["prompt_embeds"])

    def decode_latents(self, latents):
        frames = ((latents.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
        return [[Image.fromarray(frame.numpy()) for frame in sample] for sample in frames]


@pytest.fixture
def toy_video_trainer(monkeypatch, tmp_path, tiny_sd3_path):
    from transformers import AutoTokenizer

    monkeypatch.setitem(ADAPTERS, "toy_video", ToyVideoAdapter)
    monkeypatch.setattr(video, "_ffmpeg_available", lambda: False)  # GIFs: quick, read back with Pillow
    calls = []

    def recorder(prompts, completions, fps, **kwargs):
        calls.append((len(completions), [len(c) for c in completions], type(completions[0][0]), fps))
        return [0.0] * len(completions)

    def build(**overrides):
        pipeline = SimpleNamespace(
            transformer=ToyVideoTransformer(), tokenizer=AutoTokenizer.from_pretrained(tiny_sd3_path / "tokenizer")
        )
        prompts = Dataset.from_dict({"prompt": ["red", "blue turning red"]})
        settings = dict(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            num_inference_steps=2,
            eval_num_inference_steps=2,
            height=SIZE,
            width=SIZE,
            guidance_scale=1.0,
            learning_rate=1e-3,
            beta=0.0,
            report_to=[],
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
            eval_images_to_log=2,
            per_device_eval_batch_size=4,
        )
        settings.update(overrides)
        return FlowGRPOTrainer(
            pipeline,
            [recorder, "motion", "brightness@frames(every=2,pool=min)"],
            FlowGRPOConfig(**settings),
            train_dataset=prompts,
            eval_dataset=prompts,
            model_family="toy_video",
        )

    return SimpleNamespace(build=build, calls=calls, out=tmp_path)


@pytest.mark.parametrize("async_rewards", [False, True])
def test_rewards_get_frame_lists_and_fps_and_evaluation_writes_videos(toy_video_trainer, async_rewards):
    overrides = dict(async_rewards=True, rollout_batch_size=2) if async_rewards else {}
    trainer = toy_video_trainer.build(**overrides)
    trainer.train()
    calls = toy_video_trainer.calls
    assert calls and all(call[1] == [FRAMES] * call[0] and call[2] is Image.Image and call[3] == FPS for call in calls)
    assert sum(call[0] for call in calls) == 4  # the rollout batch, whole or in chunks of rollout_batch_size
    history = trainer.state.log_history[0]
    assert history["rewards/motion/mean"] > 0  # random frames move
    assert "rewards/brightness@frames(every=2,pool=min)/mean" in history
    if async_rewards:
        return
    metrics = trainer.evaluate()
    assert "eval_rewards/motion/mean" in metrics
    samples = toy_video_trainer.out / "samples"
    (listing,) = samples.glob("eval_step_*.json")
    entries = json.loads(listing.read_text())["samples"]
    assert len(entries) == 2
    for entry in entries:
        with Image.open(samples / entry["video"]) as gif:
            assert gif.n_frames == FRAMES and abs(gif.info["duration"] - 1000 / FPS) <= 10
    with Image.open(listing.with_suffix(".png")) as strips:  # a strip of FRAMES frames per row, 4 px -> 64 px high
        assert strips.size == (FRAMES * 64, 2 * 64)
