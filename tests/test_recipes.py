"""The paper recipes parse with every key valid, and without the SD3.5 weights they stop with one clear line."""

import pytest

from trl_flow.cli import main
from trl_flow.doctor import PAPER_QUANTITIES
from trl_flow.recipe import effective_quantities, parse_grpo_args


@pytest.mark.parametrize(
    ("recipe", "reward", "beta"),
    [("pickscore", "pickscore", 0.01), ("geneval", "geneval", 0.04), ("ocr", "ocr", 0.04)],
)
def test_paper_recipe_parses_with_the_paper_values(recipe, reward, beta):
    # Stated in global quantities: on this 1-process machine the paper's 48 prompts x 24 images per rollout batch
    # become 128 micro-batches of 9, and its 2 updates of 576 images a gradient accumulation of 64.
    script, config, model = parse_grpo_args(["--recipe", f"recipes/{recipe}.yaml", "--bf16", "false"])
    assert script.reward_funcs == [reward]
    assert model.model_name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert (model.lora_r, model.lora_alpha) == (32, 64)
    assert (config.num_inference_steps, config.eval_num_inference_steps, config.guidance_scale) == (10, 40, 4.5)
    assert (config.num_generations, config.beta, config.epsilon, config.noise_level) == (24, beta, 1e-4, 0.7)
    assert config.scale_rewards == "batch" and (config.height, config.width) == (512, 512)
    assert (config.prompts_per_step, config.per_device_train_batch_size) == (48, 9)
    assert (config.steps_per_generation, config.gradient_accumulation_steps) == (128, 64)
    assert effective_quantities(config, 1) == {**PAPER_QUANTITIES, "processes": 1}


@pytest.mark.parametrize("recipe", ["pickscore", "geneval", "ocr"])
def test_paper_recipe_fails_clearly_offline(recipe, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", f"recipes/{recipe}.yaml", "--bf16", "false",
         "--dataset_name", "trl-flow/tiny-prompts", "--report_to", "none", "--output_dir", str(output_dir)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load the diffusers pipeline 'stabilityai/stable-diffusion-3.5-medium'" in err
    assert not output_dir.exists()


def test_paper_recipe_without_its_prompt_folder_names_it(tmp_path, capsys):
    code = main(["grpo", "--recipe", "recipes/ocr.yaml", "--bf16", "false",
                 "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "dataset/ocr" in capsys.readouterr().err


def test_tiny_recipe_trains_the_tiny_lora_targets():
    # The tests and benchmarks train TINY_SD3_LORA_TARGETS: the demo recipe must mean the same model.
    from trl_flow.offline_models.sd3 import TINY_SD3_LORA_TARGETS

    _, _, model = parse_grpo_args(["--recipe", "recipes/tiny.yaml"])
    assert model.lora_target_modules == list(TINY_SD3_LORA_TARGETS)


def test_qwen_image_edit_counting_recipe_parses_in_global_quantities():
    # flow_grpo's counting_qwenimage_edit: 32 prompts x 16 edits, 2 updates; on 1 process 128 micro-batches of 4.
    script, config, model = parse_grpo_args(["--recipe", "recipes/counting_qwenimage_edit.yaml", "--bf16", "false"])
    assert model.model_name_or_path == "Qwen/Qwen-Image-Edit"
    assert (script.reward_funcs, config.reward_weights) == (["image_similarity", "geneval"], [0.2, 0.8])
    assert (config.num_inference_steps, config.guidance_scale, config.noise_level) == (10, 4.0, 1.0)
    assert (config.num_generations, config.prompts_per_step, config.beta) == (16, 32, 0.0)
    assert (config.steps_per_generation, config.gradient_accumulation_steps) == (128, 64)
    assert effective_quantities(config, 1)["images per optimizer update"] == 256


def test_qwen_image_edit_counting_recipe_fails_clearly_offline(tmp_path, capsys):
    # geneval alone: image_similarity is registered by the editing rewards (another branch of issue 21).
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", "recipes/counting_qwenimage_edit.yaml", "--bf16", "false", "--reward_funcs", "geneval",
         "--reward_weights", "1.0", "--dataset_name", "trl-flow/tiny-prompts", "--report_to", "none",
         "--output_dir", str(output_dir)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load the diffusers pipeline 'Qwen/Qwen-Image-Edit'" in err
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("recipe", "model_id"),
    [("wan2_1_ocr", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), ("wan2_2_pickscore", "Wan-AI/Wan2.2-T2V-A14B-Diffusers")],
)
def test_wan_recipe_fails_clearly_offline(recipe, model_id, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", f"recipes/{recipe}.yaml", "--bf16", "false",
         "--dataset_name", "trl-flow/tiny-video-prompts", "--report_to", "none", "--output_dir", str(output_dir)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"could not load the diffusers pipeline '{model_id}'" in err
    assert not output_dir.exists()


def test_wan_recipes_carry_their_sources_values():
    _, config, model = parse_grpo_args(["--recipe", "recipes/wan2_1_ocr.yaml", "--bf16", "false"])
    assert (config.height, config.width, config.num_frames) == (240, 416, 33)
    assert (config.num_inference_steps, config.eval_num_inference_steps, config.guidance_scale) == (20, 50, 4.5)
    assert (config.num_generations, config.beta, config.epsilon, model.lora_r) == (4, 0.004, 1e-3, 32)
    _, config, model = parse_grpo_args(["--recipe", "recipes/wan2_2_pickscore.yaml", "--bf16", "false"])
    assert (config.guidance_scale, config.guidance_scale_2, config.num_frames) == (4.0, 3.0, 5)
    assert config.trained_experts == ["transformer", "transformer_2"] and (model.lora_r, model.lora_alpha) == (64, 128)
    assert (config.num_generations, config.prompts_per_step, config.noise_level) == (16, 48, 0.9)
    assert config.offload_rollouts
