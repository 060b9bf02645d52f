import pytest
from trl import GRPOConfig

from trl_flow.config import LLM_ONLY_FIELDS, FlowGRPOConfig
from trl_flow.errors import UserInputError


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
