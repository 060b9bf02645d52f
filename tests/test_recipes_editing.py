"""The editing recipes parse with flow_grpo's values, fail clearly offline, and the tiny edit recipe means the tiny
Kontext task."""

from trl_flow.cli import main
from trl_flow.recipe import effective_quantities, parse_grpo_args


def test_counting_flux_kontext_parses_with_flow_grpo_values():
    script, config, model = parse_grpo_args(["--recipe", "recipes/counting_flux_kontext.yaml", "--bf16", "false"])
    assert model.model_name_or_path == "black-forest-labs/FLUX.1-Kontext-dev"
    assert script.reward_funcs == ["image_similarity", "geneval"] and config.reward_weights == [0.5, 0.5]
    assert script.image_column == "image" and (config.height, config.width) == (512, 512)
    assert (config.num_inference_steps, config.eval_num_inference_steps, config.guidance_scale) == (6, 28, 2.5)
    assert (config.num_generations, config.noise_level) == (21, 0.9)
    quantities = effective_quantities(config, 1)
    assert (
        quantities["unique prompts per rollout batch"] == 16 and quantities["optimizer updates per rollout batch"] == 2
    )


def test_counting_flux_kontext_fails_clearly_offline(tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", "recipes/counting_flux_kontext.yaml", "--bf16", "false",
         "--dataset_name", "trl-flow/tiny-edit", "--output_dir", str(output_dir)]
    )  # fmt: skip
    assert code == 2
    assert "could not load the diffusers pipeline 'black-forest-labs/FLUX.1-Kontext-dev'" in capsys.readouterr().err
    assert not output_dir.exists()
    code = main(["grpo", "--recipe", "recipes/counting_flux_kontext.yaml", "--bf16", "false",
                 "--output_dir", str(output_dir)])  # fmt: skip
    assert code == 2 and "dataset/counting_edit" in capsys.readouterr().err and not output_dir.exists()


def test_doctor_passes_on_the_tiny_edit_recipe(capsys):
    # The sampler row compares a noise-level-0 rollout with FluxKontextPipeline on the dataset's source images.
    code = main(["doctor", "--recipe", "recipes/tiny_edit.yaml", "--num_inference_steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max |pixel difference| 0 / 255" in out
    assert next(line for line in out.splitlines() if line.startswith("reward recolor_shape")).endswith("PASS")
