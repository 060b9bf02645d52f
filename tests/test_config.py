import pytest
from trl import GRPOConfig

from trl_flow.config import LLM_ONLY_FIELDS, FlowGRPOConfig
from trl_flow.errors import UserInputError
from trl_flow.global_batch import derive_batch_from_global_quantities
from trl_flow.trackers import check_trackers_installed


def test_is_a_grpo_config_with_paper_defaults():
    config = FlowGRPOConfig(output_dir="unused", report_to=[])
    assert isinstance(config, GRPOConfig)
    assert (config.num_inference_steps, config.eval_num_inference_steps) == (10, 40)
    assert (config.noise_level, config.guidance_scale, config.beta, config.epsilon) == (0.7, 4.5, 0.04, 1e-4)
    assert config.scale_rewards == "batch"
    assert config.num_trained_steps == 9  # int(10 * 0.99), as in the paper's recipes


@pytest.mark.parametrize(
    ("key", "value"),
    [("temperature", 0.7), ("max_completion_length", 64), ("use_vllm", True), ("loss_type", "grpo")],
)
def test_llm_only_fields_are_refused_by_name(key, value):
    assert key in LLM_ONLY_FIELDS
    with pytest.raises(UserInputError, match=key):
        FlowGRPOConfig(output_dir="unused", report_to=[], **{key: value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("noise_level", 0.0, "noise_level"),
        ("timestep_fraction", 1.5, "timestep_fraction"),
        ("scale_rewards", "sometimes", "scale_rewards"),
    ],
)
def test_bad_diffusion_values_are_refused(key, value, message):
    with pytest.raises(UserInputError, match=message):
        FlowGRPOConfig(output_dir="unused", report_to=[], **{key: value})


# ------------------------------------------------------------------------------------ global batch quantities
def paper_batch(**overrides):
    settings = dict(output_dir="unused", report_to=[], prompts_per_step=48, num_generations=24,
                    per_device_train_batch_size=9, updates_per_generation=2)  # fmt: skip
    settings.update(overrides)
    return settings


@pytest.mark.parametrize(("world_size", "steps", "accumulation"), [(32, 4, 2), (8, 16, 8), (2, 64, 32)])
def test_prompts_per_step_derives_the_per_process_batch(world_size, steps, accumulation, monkeypatch):
    from trl_flow import config as config_module

    monkeypatch.setattr(config_module, "launched_world_size", lambda: world_size)
    with pytest.raises(UserInputError, match=f"derived for {world_size} process"):
        FlowGRPOConfig(**paper_batch())  # this test process is 1 process: the mismatch is refused, not used
    config = FlowGRPOConfig.__new__(FlowGRPOConfig)
    config.__dict__.update(paper_batch(steps_per_generation=None, generation_batch_size=None,
                                       gradient_accumulation_steps=1))  # fmt: skip
    derive_batch_from_global_quantities(config, world_size)
    assert (config.steps_per_generation, config.gradient_accumulation_steps) == (steps, accumulation)
    # The official 32-GPU layout: 9 images x 4 micro-batches per GPU, 2 optimizer updates per rollout batch.
    assert 9 * world_size * steps == 48 * 24 and steps // accumulation == 2


def test_prompts_per_step_on_one_process():
    config = FlowGRPOConfig(**paper_batch())
    assert (config.steps_per_generation, config.gradient_accumulation_steps) == (128, 64)
    assert config.generation_batch_size == 48 * 24


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 10}, r"per_device_train_batch_size can be one of \[1, 2, 3, 4, 6, 8, 9,"),
        ({"updates_per_generation": 5}, r"updates_per_generation 5 does not divide the 128 .* one of \[1, 2, 4,"),
        ({"steps_per_generation": 8}, "steps_per_generation 8 contradicts prompts_per_step 48"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps 2 contradicts"),
        ({"generation_batch_size": 1152}, "generation_batch_size"),
        ({"prompts_per_step": None}, "updates_per_generation needs prompts_per_step"),
    ],
)
def test_global_quantities_that_do_not_divide_name_the_values_that_would(overrides, message):
    with pytest.raises(UserInputError, match=message):
        FlowGRPOConfig(**paper_batch(**overrides))


@pytest.mark.parametrize("key, value", [("save_steps", 7), ("save_total_limit", 2)])
def test_save_keys_without_a_save_strategy_warn_naming_both(key, value, caplog):
    with caplog.at_level("WARNING", logger="trl_flow.config"):
        FlowGRPOConfig(output_dir="unused", save_strategy="no", **{key: value})
    warnings = [record.getMessage() for record in caplog.records if record.name == "trl_flow.config"]
    assert len(warnings) == 1 and f"{key} = {value}" in warnings[0] and "save_strategy is 'no'" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_flow.config"):
        FlowGRPOConfig(output_dir="unused", save_strategy="steps", **{key: value})
        FlowGRPOConfig(output_dir="unused", save_strategy="no")
    assert not [record for record in caplog.records if record.name == "trl_flow.config"]


def test_a_tracker_that_is_not_installed_is_refused_naming_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(UserInputError, match=r"report_to: wandb needs the 'wandb' package.*trl-flow\[wandb\]"):
        check_trackers_installed(["none", "wandb"])
    check_trackers_installed(["none"])
