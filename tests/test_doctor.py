import trl_flow.rollout
from trl_flow.cli import main
from trl_flow.sde import sde_step_with_logprob

FAST = ["--recipe", "recipes/tiny.yaml", "--num_inference_steps", "4"]


def run(capsys, *extra):
    code = main(["doctor", *FAST, *extra])
    return code, capsys.readouterr().out


def row(output, name):
    return next(line for line in output.splitlines() if line.startswith(name))


def test_tiny_recipe_passes(capsys):
    code, out = run(capsys)
    assert code == 0, out
    assert row(out, "SDE at noise_level 0").endswith("PASS")
    assert "max |pixel difference| 0 / 255" in out
    assert row(out, "on-policy ratio").endswith("PASS")
    assert row(out, "reward prompt_color").endswith("PASS")
    assert "images per prompt" in out and "(paper: 24)" in out
    assert "all checks passed" in out


def test_dropout_breaks_the_on_policy_ratio(capsys):
    code, out = run(capsys, "--lora_dropout", "0.2", "--disable_dropout", "false")
    assert code == 1
    assert row(out, "on-policy ratio").endswith("FAIL")
    assert "set disable_dropout true (or lora_dropout 0)" in out
    assert row(out, "SDE at noise_level 0").endswith("PASS")  # the sampler itself is still right


def test_a_wrong_step_function_fails_the_sampler_row(capsys, monkeypatch):
    def euler_with_a_bug(velocity, sigma, sigma_next, sample, noise_level=0.7, **kwargs):
        out = sde_step_with_logprob(velocity, sigma, sigma_next, sample, noise_level, **kwargs)
        if noise_level == 0:
            out.prev_sample = out.prev_sample + 0.3
        return out

    monkeypatch.setattr(trl_flow.rollout, "sde_step_with_logprob", euler_with_a_bug)
    code, out = run(capsys)
    assert code == 1
    assert row(out, "SDE at noise_level 0").endswith("FAIL")


def test_effective_quantities_are_reported(capsys):
    code, out = run(capsys, "--steps_per_generation", "4", "--per_device_train_batch_size", "4")
    assert code == 0
    # 4 per device x 4 micro-batches = 16 images = 2 prompts x 8; 4 optimizer updates (no accumulation).
    assert "2 (paper: 48)" in row(out, "unique prompts per rollout batch")
    assert "4 (paper: 2)" in row(out, "optimizer updates per rollout batch")
    assert "4 (paper: 576)" in row(out, "images per optimizer update")


def test_tiny_wan_recipe_passes(capsys):
    # Video: the doctor's sampler, on-policy and reward rows on 5-D latents and lists of frames.
    code = main(["doctor", "--recipe", "recipes/tiny_wan.yaml"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert row(out, "SDE at noise_level 0").endswith("PASS")
    assert "max |pixel difference| 0 / 255" in out
    assert row(out, "on-policy ratio").endswith("PASS")
    assert row(out, "reward color_transition").endswith("PASS")
