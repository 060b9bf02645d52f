"""DiffusionNFT: the loss against an independent reading of the paper's equations, zero gradient for a constant
reward, the (adaptive) flow-matching gradient when every sample is positive, the old policy's schedule and
rollouts, learning, exact resume, and the doctor."""

from types import SimpleNamespace

import pytest
import torch

from tests.factories import prompt_color_before_and_after_training, tiny_trainer
from trl_flow.algorithms import ALGORITHMS, DiffusionNFT
from trl_flow.algorithms.forward_process import decay_schedule
from trl_flow.algorithms.nft import nft_policy_loss, optimality_probability
from trl_flow.cli import main
from trl_flow.config import FlowGRPOConfig
from trl_flow.errors import UserInputError


def random_case(seed=0, batch=5, shape=(3, 4, 4)):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=generator)
    noise = torch.randn(batch, *shape, generator=generator)
    t = torch.rand(batch, generator=generator) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v_old = noise - x0 + 0.3 * torch.randn(batch, *shape, generator=generator)
    v = v_old + 0.1 * torch.randn(batch, *shape, generator=generator)
    return x0, noise, t, x_t, v_old, v


def paper_loss(v, v_old, noise, x0, t, advantages, beta, a_max=5.0):
    """The paper in float64, read independently: with x0_hat - x0 = t (eps - x0 - v), the adaptive x0 loss of a
    velocity u is t^2 mean((eps - x0 - u)^2) / (t mean|eps - x0 - u|); r from the advantage clipped to +-A_max."""
    v, v_old, noise, x0, t, advantages = (x.double() for x in (v, v_old, noise, x0, t, advantages))
    losses = []
    for i in range(v.shape[0]):
        target = noise[i] - x0[i]

        def half(u, i=i, target=target):
            residual = target - u
            return t[i] ** 2 * (residual**2).mean() / max((t[i] * residual.abs()).mean().item(), 1e-5)

        r = min(max(advantages[i].item(), -a_max), a_max) / a_max * 0.5 + 0.5
        positive = half(beta * v[i] + (1 - beta) * v_old[i])
        negative = half((1 + beta) * v_old[i] - beta * v[i])
        losses.append(a_max * (r * positive + (1 - r) * negative) / beta)
    return torch.stack(losses)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_matches_the_paper_equations(beta):
    x0, noise, t, x_t, v_old, v = random_case()
    advantages = torch.tensor([2.0, -1.0, 0.0, 7.0, -6.0])  # inside and outside the +-5 clip
    ours, _, _ = nft_policy_loss(v, v_old, x_t, x0, t, advantages, beta, 5.0)
    torch.testing.assert_close(ours.double(), paper_loss(v, v_old, noise, x0, t, advantages, beta), rtol=1e-4, atol=0)


def test_optimality_probability():
    r = optimality_probability(torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_constant_reward_gives_zero_gradient_on_policy():
    """A constant reward: every advantage 0, r = 1/2, and at v = v_old the two implicit policies' gradients cancel."""
    x0, _, t, x_t, v_old, _ = random_case()
    v = v_old.clone().requires_grad_()
    loss, _, _ = nft_policy_loss(v, v_old, x_t, x0, t, torch.zeros(5), 1.0, 5.0)
    loss.mean().backward()
    assert v.grad.abs().max() < 1e-7
    # ... which is not a vanishing loss: a positive advantage moves the policy.
    v2 = v_old.clone().requires_grad_()
    nft_policy_loss(v2, v_old, x_t, x0, t, torch.ones(5), 1.0, 5.0)[0].mean().backward()
    assert v2.grad.abs().max() > 1e-3


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_all_positive_gives_the_flow_matching_gradient(beta):
    """r = 1 everywhere: at v = v_old the gradient is A_max times that of the adaptive-weighted flow-matching loss
    t^2 mean((v - (eps - x0))^2) / sg(t mean|v - (eps - x0)|), whatever beta."""
    x0, noise, t, x_t, v_old, _ = random_case()
    v = v_old.clone().requires_grad_()
    nft_policy_loss(v, v_old, x_t, x0, t, torch.full((5,), 5.0), beta, 5.0)[0].sum().backward()
    u = v_old.clone().requires_grad_()
    residual = u - (noise - x0)
    tb = t.view(-1, 1, 1, 1)
    weight = (tb * residual).abs().mean(dim=(1, 2, 3)).detach()
    flow_matching = (tb**2 * residual**2).mean(dim=(1, 2, 3)) / weight
    (5.0 * flow_matching).sum().backward()
    torch.testing.assert_close(v.grad, u.grad, rtol=1e-4, atol=1e-6)


def test_old_policy_decay_schedules():
    assert [decay_schedule(s, 0.001, 0.5) for s in (0, 1, 300, 600)] == [0.0, 0.001, 0.3, 0.5]
    assert decay_schedule(74, 0.0075, 0.999, 75) == 0.0 and decay_schedule(75, 0.0075, 0.999, 75) == 0.0
    assert decay_schedule(85, 0.0075, 0.999, 75) == pytest.approx(0.075)
    assert decay_schedule(10_000, 0.0075, 0.999, 75) == 0.999


def test_is_registered_and_validates_its_keys():
    assert ALGORITHMS["nft"] is DiffusionNFT and DiffusionNFT.rollout_record == "final_latents"
    with pytest.raises(UserInputError, match="nft_beta"):
        FlowGRPOConfig(output_dir="/tmp/x", algorithm="nft", nft_beta=0.0, report_to=[])
    with pytest.raises(UserInputError, match="policy_ema_decay_max"):
        FlowGRPOConfig(output_dir="/tmp/x", algorithm="nft", policy_ema_decay_max=1.0, report_to=[])
    # CFG-free by default, whatever the evaluation's guidance_scale; train_guidance_scale opts in.
    args = SimpleNamespace(
        beta=0.0, guidance_scale=4.5, train_guidance_scale=None, nft_beta=1.0, advantage_clip=5.0, num_iterations=1
    )
    assert DiffusionNFT(args, adapter=None).guidance_scale == 1.0
    args.train_guidance_scale = 4.0
    assert DiffusionNFT(args, adapter=None).guidance_scale == 4.0


def test_rollouts_are_ode_samples_of_the_old_policy_and_its_decay_is_applied(tiny_sd3_path, tmp_path):
    trainer = tiny_trainer(tiny_sd3_path, tmp_path / "out", algorithm="nft", max_steps=2, train_timesteps=2)
    batch = trainer._generate_and_score_completions([{"prompt": "a red image"}] * 16)
    assert set(batch) == {"final_latents", "advantages"} | {k for k in batch if k.startswith("cond_")}
    # Deterministic: the same seed gives the same latents (no SDE noise).
    again = trainer._generate_and_score_completions([{"prompt": "a red image"}] * 16)
    torch.testing.assert_close(batch["final_latents"], again["final_latents"])
    old = trainer.algorithm.averages["old"]
    trainer.train()
    # 2 updates per rollout batch: after update 2 the old policy moved with d = 0.001 * 2.
    assert old.num_updates == 1
    for name, parameter in old.parameters.items():
        assert not torch.equal(old.shadow[name], parameter.detach())
        break


def test_learns_a_prompt_conditional_reward(tiny_sd3_path, tmp_path):
    """As the other learning tests; measured (loaded 2-core machine): 0.0002 -> 0.2326, SE 0.0180 (12.9 SE)."""
    trainer = tiny_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        algorithm="nft",
        max_steps=100,
        learning_rate=1e-2,
        train_timesteps=2,
        per_device_train_batch_size=16,  # both prompts' groups in each update, one update per rollout batch
        steps_per_generation=1,
    )
    before, after, standard_error = prompt_color_before_and_after_training(trainer, 6)
    assert after - before > 4 * standard_error, (before, after, standard_error)


def test_doctor_passes_on_an_nft_recipe_and_fails_with_dropout(capsys):
    fast = ["doctor", "--recipe", "recipes/tiny_nft.yaml", "--num_inference_steps", "4"]
    code = main(fast)
    out = capsys.readouterr().out
    assert code == 0, out
    assert next(line for line in out.splitlines() if line.startswith("constant reward")).endswith("PASS")
    code = main([*fast, "--lora_dropout", "0.2", "--disable_dropout", "false"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert next(line for line in out.splitlines() if line.startswith("constant reward")).endswith("FAIL")
    assert "set disable_dropout true (or lora_dropout 0)" in out


def resumed_and_uninterrupted(tiny_sd3_path, tmp_path, **overrides):
    """An uninterrupted 6-update run that checkpoints at update 3 (inside a rollout batch of 2 updates), and a
    run resumed from that checkpoint: their trained weights and the algorithm's averages."""
    common = dict(max_steps=6, learning_rate=5e-2, train_timesteps=2, save_strategy="steps", save_steps=3)
    common.update(overrides)
    full = tiny_trainer(tiny_sd3_path, tmp_path / "full", **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "algorithm_state.safetensors").is_file()
    resumed = tiny_trainer(tiny_sd3_path, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def state(trainer):
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return weights, trainer.algorithm.state_dict()

    return state(full), state(resumed)


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_resume_is_exact_with_the_old_policy_in_the_checkpoint(tiny_sd3_path, tmp_path):
    (weights, averages), (resumed_weights, resumed_averages) = resumed_and_uninterrupted(
        tiny_sd3_path, tmp_path, algorithm="nft", beta=0.01
    )
    assert {k.split("/")[0].split("#")[0] for k in averages} == {"old"}
    print(f"nft resume: max |weight diff| {max_difference(weights, resumed_weights):.3g}")
    assert max_difference(weights, resumed_weights) <= 1e-5
    assert max_difference(averages, resumed_averages) <= 1e-5
