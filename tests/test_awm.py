"""AWM: the surrogate and the clipped loss against an independent reading of the paper's equations, zero gradient
for a constant reward, the flow-matching gradient when every sample is positive, the stratified timesteps, the
off-policy ratio and KL-EMA in the trainer, learning, and the doctor."""

import math
from collections import defaultdict

import pytest
import torch

from tests.factories import prompt_color_before_and_after_training, tiny_trainer
from trl_flow.algorithms import ALGORITHMS, AWM
from trl_flow.algorithms.awm import stratified_indices, surrogate_weight
from trl_flow.cli import main
from trl_flow.config import FlowGRPOConfig
from trl_flow.errors import UserInputError


class ToyAdapter:
    """predict_velocity = the tensor the test put in conditioning["velocity"] (so the loss sees a chosen v)."""

    def predict_velocity(self, denoiser, latents, sigma, conditioning, guidance_scale):
        return denoiser(latents, conditioning["velocity"])


def awm(**overrides):
    settings = dict(
        output_dir="/tmp/awm-test",
        algorithm="awm",
        report_to=[],
        num_inference_steps=14,
        timestep_fraction=0.9,
        train_timesteps=6,
        epsilon=1.0,
        beta=0.0,
        awm_ema_kl_beta=0.0,
    )
    return AWM(FlowGRPOConfig(**{**settings, **overrides}), ToyAdapter())


def toy_case(seed=0, batch=6, shape=(3, 4, 4)):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=generator)
    noise = torch.randn(batch, *shape, generator=generator)
    t = torch.full((batch,), 0.6)
    x_t = (1 - 0.6) * x0 + 0.6 * noise
    velocity = (noise - x0) + 0.5 * torch.randn(batch, *shape, generator=generator)
    return x0, noise, t, x_t, velocity


def term(algorithm, x0, noise, t, x_t, velocity, advantages, old_velocity=None):
    """AWM's term loss on a chosen velocity (a leaf whose gradient the test reads)."""
    v = velocity.clone().requires_grad_()
    batch = {"final_latents": x0, "advantages": advantages, "cond_velocity": v}
    prepared = {"t": t, "x_t": x_t, "target": noise - x0}
    if old_velocity is not None:
        prepared["v_old"] = old_velocity
    loss = algorithm.term_loss(lambda latents, value: value, batch, 0, prepared, defaultdict(list))
    return loss, v


def paper_ghuber(error, t, p=0.25):
    return t * ((error + 1e-10) ** p - 1e-10**p) / p


def test_surrogates_match_the_paper():
    error, t = torch.tensor([0.0, 0.3, 2.0]), torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(surrogate_weight(error, t, "ghuber"), paper_ghuber(error, t))
    torch.testing.assert_close(surrogate_weight(error, t, "uniform"), error)
    torch.testing.assert_close(surrogate_weight(error, t, "t2"), t**2 * error)
    torch.testing.assert_close(surrogate_weight(error, t, "huber"), t * (torch.sqrt(error + 1e-10) - 1e-5))
    assert surrogate_weight(torch.zeros(1), torch.ones(1), "ghuber").item() == 0.0


def test_clipped_loss_matches_the_paper_off_policy():
    """rho = exp(-w(l_theta) + w(l_old)), A' = clip(A, +-5) / 5, loss = mean max(-A' rho, -A' clip(rho, 1 +- c))."""
    x0, noise, t, x_t, velocity = toy_case()
    old = velocity + 0.3 * torch.randn(velocity.shape, generator=torch.Generator().manual_seed(1))
    advantages = torch.tensor([3.0, -2.0, 7.0, -8.0, 0.5, 0.0])
    algorithm = awm(epsilon=0.2)
    loss, _ = term(algorithm, x0, noise, t, x_t, velocity, advantages, old_velocity=old)
    expected = []
    for i in range(6):
        error = ((velocity[i].double() - (noise[i] - x0[i]).double()) ** 2).mean()
        old_error = ((old[i].double() - (noise[i] - x0[i]).double()) ** 2).mean()
        rho = math.exp(-paper_ghuber(error, 0.6).item() + paper_ghuber(old_error, 0.6).item())
        a = max(min(advantages[i].item(), 5.0), -5.0) / 5.0
        expected.append(max(-a * rho, -a * min(max(rho, 0.8), 1.2)))
    assert loss.item() == pytest.approx(sum(expected) / 6, rel=1e-5)


def test_constant_reward_gives_zero_gradient():
    x0, noise, t, x_t, velocity = toy_case()
    loss, v = term(awm(), x0, noise, t, x_t, velocity, torch.zeros(6))
    loss.backward()
    assert v.grad.abs().max() == 0.0


def test_all_positive_gives_the_flow_matching_gradient():
    """On-policy, every A' = 1, uniform weighting: the gradient of mean_B mean_D (v - (eps - x0))^2."""
    x0, noise, t, x_t, velocity = toy_case()
    loss, v = term(awm(awm_weighting="uniform"), x0, noise, t, x_t, velocity, torch.full((6,), 5.0))
    loss.backward()
    u = velocity.clone().requires_grad_()
    ((u - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).mean().backward()
    torch.testing.assert_close(v.grad, u.grad)


def test_stratified_timesteps_cover_the_range_without_sigma_one():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        indices = stratified_indices(1, 12, 6, generator)  # 14 steps x 0.9: indices [1, 12)
        assert len(indices) == 6 and torch.all(indices[1:] > indices[:-1])
        assert indices.min() >= 1 and indices.max() < 12
        seen.update(indices.tolist())
    assert seen == set(range(1, 12))


def test_is_registered_and_validates_its_keys():
    assert ALGORITHMS["awm"] is AWM and AWM.rollout_record == "final_latents"
    with pytest.raises(UserInputError, match="awm_weighting"):
        awm(awm_weighting="l1")
    with pytest.raises(UserInputError, match="train_timesteps"):
        awm(train_timesteps=12)
    assert awm().guidance_scale == 1.0 and awm(train_guidance_scale=3.0).guidance_scale == 3.0


def test_second_update_of_a_batch_is_off_policy_and_the_kl_ema_moves(tiny_sd3_path, tmp_path):
    """The tiny settings train 2 updates per rollout batch: the first has rho = 1 exactly, the second compares to the
    rollout's weights; the KL-EMA starts at the weights and moves once per batch."""
    trainer = tiny_trainer(
        tiny_sd3_path, tmp_path / "out", algorithm="awm", max_steps=4, train_timesteps=2, epsilon=1.0, beta=0.01
    )
    assert set(trainer.algorithm.averages) == {"kl_ema", "rollout"}
    trainer.train()
    deviations = [e["ratio/max_abs_deviation"] for e in trainer.state.log_history if "ratio/max_abs_deviation" in e]
    assert deviations[0] == 0.0 and deviations[2] == 0.0 and deviations[1] > 0 and deviations[3] > 0
    kl_ema = [e["awm/ema_kl"] for e in trainer.state.log_history if "awm/ema_kl" in e]
    assert kl_ema[0] == 0.0 and kl_ema[1] > 0
    assert trainer.algorithm.averages["kl_ema"].num_updates == 2
    assert all("kl" in e for e in trainer.state.log_history if "ratio/max_abs_deviation" in e)


def test_learns_a_prompt_conditional_reward(tiny_sd3_path, tmp_path):
    """As the other learning tests; measured (loaded 2-core machine): 0.0002 -> 0.2435, SE 0.0180 (13.5 SE)."""
    trainer = tiny_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        algorithm="awm",
        max_steps=50,
        learning_rate=1e-2,
        train_timesteps=2,
        epsilon=1.0,
        per_device_train_batch_size=16,  # both prompts' groups in each update: on-policy, rho = 1
        steps_per_generation=1,
    )
    before, after, standard_error = prompt_color_before_and_after_training(trainer, 6)
    assert after - before > 4 * standard_error, (before, after, standard_error)


def test_doctor_passes_on_an_awm_recipe_and_fails_with_dropout(capsys):
    fast = ["doctor", "--recipe", "recipes/tiny_awm.yaml", "--num_inference_steps", "6"]
    code = main(fast)
    out = capsys.readouterr().out
    assert code == 0, out
    assert next(line for line in out.splitlines() if line.startswith("on-policy ratio")).endswith("PASS")
    code = main([*fast, "--lora_dropout", "0.2", "--disable_dropout", "false"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert next(line for line in out.splitlines() if line.startswith("on-policy ratio")).endswith("FAIL")
    assert "set disable_dropout true (or lora_dropout 0)" in out


def test_resume_is_exact_with_the_kl_ema_and_rollout_weights_in_the_checkpoint(tiny_sd3_path, tmp_path):
    from tests.test_nft import max_difference, resumed_and_uninterrupted

    (weights, averages), (resumed_weights, resumed_averages) = resumed_and_uninterrupted(
        tiny_sd3_path, tmp_path, algorithm="awm", epsilon=1.0, beta=0.01
    )
    assert {k.split("/")[0].split("#")[0] for k in averages} == {"kl_ema", "rollout"}
    print(f"awm resume: max |weight diff| {max_difference(weights, resumed_weights):.3g}")
    assert max_difference(weights, resumed_weights) <= 1e-5
    assert max_difference(averages, resumed_averages) <= 1e-5
