"""The paper recipes parse with every key valid, and without the SD3.5 weights they stop with one clear line."""

import pytest

from trl_flow.cli import main, parse_grpo_args


@pytest.mark.parametrize(
    ("recipe", "reward", "beta"),
    [("pickscore", "pickscore", 0.01), ("geneval", "geneval", 0.04), ("ocr", "ocr", 0.04)],
)
def test_paper_recipe_parses_with_the_paper_values(recipe, reward, beta):
    # 32 processes in the paper; on this 1-process machine, 8 micro-batches of 9 keep whole groups of 24.
    script, config, model = parse_grpo_args(
        ["--recipe", f"recipes/{recipe}.yaml", "--steps_per_generation", "8", "--bf16", "false"]
    )
    assert script.reward_funcs == [reward]
    assert model.model_name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert (model.lora_r, model.lora_alpha) == (32, 64)
    assert (config.num_inference_steps, config.eval_num_inference_steps, config.guidance_scale) == (10, 40, 4.5)
    assert (config.num_generations, config.beta, config.epsilon, config.noise_level) == (24, beta, 1e-4, 0.7)
    assert config.scale_rewards == "batch" and (config.height, config.width) == (512, 512)


@pytest.mark.parametrize("recipe", ["pickscore", "geneval", "ocr"])
def test_paper_recipe_fails_clearly_offline(recipe, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", f"recipes/{recipe}.yaml", "--steps_per_generation", "8", "--bf16", "false",
         "--dataset_name", "trl-flow/tiny-prompts", "--report_to", "none", "--output_dir", str(output_dir)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load the diffusers pipeline 'stabilityai/stable-diffusion-3.5-medium'" in err
    assert not output_dir.exists()


def test_paper_recipe_without_its_prompt_folder_names_it(tmp_path, capsys):
    code = main(["grpo", "--recipe", "recipes/ocr.yaml", "--steps_per_generation", "8", "--bf16", "false",
                 "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "dataset/ocr" in capsys.readouterr().err
