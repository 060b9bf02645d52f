"""A run's batch from global quantities (``prompts_per_step``, ``updates_per_generation``), the way the papers
state it, turned into TRL's per-process ``steps_per_generation`` and ``gradient_accumulation_steps`` for the number
of processes the launcher started."""

from __future__ import annotations

import os
from typing import Any

from .errors import UserInputError


def launched_world_size() -> int:
    """The number of processes of this run, as the launcher (torchrun, accelerate, DeepSpeed, MPI) announces it.

    Read before TrainingArguments sets up the process group, so that TRL's batch checks in GRPOConfig.__post_init__
    see per-process values derived for the right number of processes. An already initialised accelerate state wins.
    """
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState().num_processes
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def derive_batch_from_global_quantities(config: Any, world_size: int) -> None:
    """Sets ``config``'s steps_per_generation and gradient_accumulation_steps from prompts_per_step, num_generations,
    updates_per_generation, per_device_train_batch_size and the number of processes (TRL's own batch checks run
    afterwards, in GRPOConfig.__post_init__, on the derived values)."""
    if config.prompts_per_step is None:
        raise UserInputError("updates_per_generation needs prompts_per_step (the global rollout batch)")
    if config.generation_batch_size is not None:
        raise UserInputError(
            "prompts_per_step and generation_batch_size both set the rollout batch: remove generation_batch_size "
            "(prompts_per_step x num_generations images per rollout batch, over all processes)"
        )
    prompts, group, micro = config.prompts_per_step, config.num_generations, config.per_device_train_batch_size
    updates = 1 if config.updates_per_generation is None else config.updates_per_generation
    if prompts < 1 or group < 2 or micro < 1 or updates < 1:
        raise UserInputError(
            f"prompts_per_step ({prompts}), updates_per_generation ({updates}) and per_device_train_batch_size "
            f"({micro}) must be >= 1, and num_generations ({group}) >= 2"
        )
    images = prompts * group
    if images % (micro * world_size):
        per_process = images // world_size if images % world_size == 0 else None
        options = _divisors(per_process) if per_process else []
        processes = [n for n in _divisors(images) if (images // n) % micro == 0 and n <= 1024]
        raise UserInputError(
            f"prompts_per_step {prompts} x num_generations {group} = {images} images per rollout batch do not "
            f"split into micro-batches of per_device_train_batch_size {micro} on {world_size} process(es). "
            + (
                f"With {world_size} process(es), per_device_train_batch_size can be one of {options}; "
                if options
                else f"{images} images cannot be split evenly over {world_size} processes; "
            )
            + (
                f"with per_device_train_batch_size {micro}, the number of processes can be one of {processes}."
                if processes
                else f"per_device_train_batch_size {micro} does not divide {images} for any number of processes."
            )
        )
    steps = images // (micro * world_size)
    if steps % updates:
        raise UserInputError(
            f"updates_per_generation {updates} does not divide the {steps} micro-batches per rollout batch "
            f"(prompts_per_step {prompts} x num_generations {group} / (per_device_train_batch_size {micro} x "
            f"{world_size} process(es))): use one of {_divisors(steps)}, or change per_device_train_batch_size"
        )
    # Values that equal the derived ones are accepted (e.g. a config rebuilt from its own to_dict()).
    for name, derived, default in (
        ("steps_per_generation", steps, None),
        ("gradient_accumulation_steps", steps // updates, 1),
    ):
        given = getattr(config, name)
        if given != default and given != derived:
            raise UserInputError(
                f"{name} {given} contradicts prompts_per_step {prompts}, which gives {name} {derived} with "
                f"per_device_train_batch_size {micro}, updates_per_generation {updates} and {world_size} "
                f"process(es): remove {name} from the recipe (it is derived from the number of processes)"
            )
    config.steps_per_generation = steps
    config.gradient_accumulation_steps = steps // updates
    config._derived_for_world_size = world_size
