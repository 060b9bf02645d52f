"""antithetic_sampling: training images come in mirrored pairs (same initial noise, SDE noise eps and -eps)."""

import pytest
import torch

from tests.test_trainer import make_trainer
from trl_flow.config import FlowGRPOConfig
from trl_flow.errors import UserInputError


def _training_batch(trainer, num_images=16):
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i // 8]) for i in range(num_images)]
    return trainer._generate_and_score_completions(inputs)


@pytest.mark.parametrize("per_image_noise", [False, True])
def test_pairs_share_the_start_and_mirror_the_sde_noise(tiny_sd3_path, tmp_path, per_image_noise):
    # Window [2, 4): steps 0-1 are ODE steps, so a pair reaches the window from one start; per-image noise
    # (prompts_per_step) draws from one generator per image, the pair's first image drawing for both.
    batch_keys = {"prompts_per_step": 2} if per_image_noise else {}
    trainer = make_trainer(
        tiny_sd3_path,
        tmp_path,
        antithetic_sampling=True,
        num_inference_steps=6,
        sde_window_size=2,
        sde_window_range=[2, 3],
        **batch_keys,
    )
    batch = _training_batch(trainer)
    start, after, step_mean = batch["latents"][:, 0], batch["next_latents"][:, 0], None
    assert torch.equal(start[0::2], start[1::2])
    assert not torch.allclose(start[0::2][0], start[0::2][1])  # different pairs, different starts
    # mirrored noise: the pair's two results lie symmetrically around the step's (shared) mean, so their
    # log-probabilities are equal while the results differ
    step_mean = (after[0::2] + after[1::2]) / 2
    assert not torch.allclose(after[0::2], after[1::2])
    log_probs = batch["old_log_probs"][:, 0]
    torch.testing.assert_close(log_probs[0::2], log_probs[1::2])
    # the mean is the deterministic part of the step: rescoring the pair's first image with the current policy
    # (on-policy) gives the same mean the pair is mirrored around
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        rescored = trainer.rescore_step(model, batch, 0)
    torch.testing.assert_close(rescored.mean[0::2], step_mean, rtol=1e-4, atol=1e-5)


def test_off_by_default_and_evaluation_is_not_paired(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, num_inference_steps=4, sde_window_size=1, sde_window_range=[0, 1])
    assert trainer.args.antithetic_sampling is False
    start = _training_batch(trainer)["latents"][:, 0]
    assert not torch.allclose(start[0], start[1])
    trainer.args.antithetic_sampling = True
    images = trainer.generate_images(["a red image"] * 2, num_inference_steps=2)  # eval: independent noise
    assert images[0].tobytes() != images[1].tobytes()


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"num_generations": 3, "per_device_train_batch_size": 6}, "num_generations = 3"),
        ({"rollout_batch_size": 5}, "rollout_batch_size = 5"),
    ],
)
def test_odd_pair_boundaries_are_refused(tmp_path, keys, named):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8, report_to=[])
    settings.update(keys)
    with pytest.raises(UserInputError, match=named):
        FlowGRPOConfig(antithetic_sampling=True, **settings)
