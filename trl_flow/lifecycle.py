"""What a training run needs to survive a crash or a kill and resume exactly: atomic checkpoints, the state beyond
transformers' own (TRL's buffered generation batch and micro-step counter, the EMA), and an epoch-seeded sampler.

Checkpoint layout (unchanged since the first release): ``checkpoint-N/`` holds transformers' files (weights,
optimizer, scheduler, RNG, ``trainer_state.json``), the diffusers LoRA (and ``ema/``), and ours:
``flow_trainer_state.json``, ``rollout_buffer-<process>.safetensors`` (mid-generation-batch only),
``ema_state.safetensors`` and ``algorithm_state.safetensors`` (DiffusionNFT's old policy, AWM's KL-EMA).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from trl.trainer.utils import RepeatSampler

from .errors import UserInputError

logger = logging.getLogger(__name__)

#: A checkpoint is written as ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete. transformers'
#: ``get_last_checkpoint`` (``^checkpoint-N$``) and checkpoint rotation (``checkpoint-*``) never see the temporary name.
CHECKPOINT_STAGING_PREFIX = "tmp-"
_STAGING_DIR = re.compile(rf"^{CHECKPOINT_STAGING_PREFIX}(old-)?{PREFIX_CHECKPOINT_DIR}-\d+$")
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: Files an exact resume needs beyond transformers' own: JSON state, per-process rollout buffers, the EMA.
FLOW_STATE_NAME = "flow_trainer_state.json"
ROLLOUT_BUFFER_NAME = "rollout_buffer-{process}.safetensors"
EMA_STATE_NAME = "ema_state.safetensors"
#: The algorithm's state beyond the weights (DiffusionNFT's old policy, AWM's KL-EMA), when it has any.
ALGORITHM_STATE_NAME = "algorithm_state.safetensors"
#: Sub-folder (of a checkpoint or the final output) with the EMA weights in diffusers format.
EMA_DIR = "ema"
TRAINER_STATE_NAME = "trainer_state.json"


def check_hub_access(args: Any) -> None:
    """With ``push_to_hub``, fail now (not after hours of training) if the Hub is unreachable or not logged in."""
    if not getattr(args, "push_to_hub", False):
        return
    from huggingface_hub import constants, whoami

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise UserInputError(
            "push_to_hub needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE): unset it, or train "
            "without push_to_hub and upload the output folder later (`hf upload`)"
        )
    try:
        whoami(token=getattr(args, "hub_token", None))
    except Exception as error:  # network errors, 401s, missing token: all mean the push would fail at the end
        raise UserInputError(
            f"push_to_hub needs a reachable Hugging Face Hub and a login with write access ({type(error).__name__}: "
            f"{error}); log in with `hf auth login` or set HF_TOKEN, or train without push_to_hub"
        ) from error


# ------------------------------------------------------------------------------------------ atomic checkpoints
def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-N`` folder with the largest N in ``output_dir`` (None if there is none).

    Temporary folders of an interrupted save are ignored, and so is a ``checkpoint-N`` without a trainer state
    (e.g. written by a writer that was not atomic)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT_DIR.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    )
    return str(steps[-1][1]) if steps else None


def remove_staging_dirs(run_dir: str) -> None:
    """Delete the temporary folders a save killed midway left behind."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if _STAGING_DIR.match(name):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def publish_dir(staging_dir: str, final_dir: str) -> None:
    """Rename a finished ``staging_dir`` to ``final_dir`` (replacing an older ``final_dir`` of the same name)."""
    if os.path.exists(final_dir):
        parent, name = os.path.split(final_dir)
        old = os.path.join(parent, f"{CHECKPOINT_STAGING_PREFIX}old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(staging_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging_dir, final_dir)
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        fd = os.open(os.path.dirname(final_dir) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint_atomically(trainer: Any, trial: Any) -> None:
    """transformers' `Trainer._save_checkpoint`, written to ``tmp-checkpoint-N`` and renamed to ``checkpoint-N``
    when complete; with the state `save_flow_state` adds.

    A run killed while saving leaves only the temporary folder, which resuming ignores (and the next save deletes);
    the previous checkpoint stays the latest complete one."""
    args = trainer.args
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    final_dir = os.path.join(run_dir, name)
    staging_dir = os.path.join(run_dir, CHECKPOINT_STAGING_PREFIX + name)
    if args.should_save:
        remove_staging_dirs(run_dir)
    trainer.accelerator.wait_for_everyone()

    trainer.save_model(staging_dir, _internal_call=True)
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(staging_dir)
        trainer._save_scaler(staging_dir)
        trainer._save_rng_state(staging_dir)
        trainer._save_flow_state(staging_dir)
    best_step = trainer.state.best_global_step
    if best_step and args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == trainer.state.global_step or os.path.isdir(best_dir):
            trainer.state.best_model_checkpoint = best_dir
    if args.should_save:
        for callback in [*trainer.callback_handler.callbacks, trainer.control]:
            if isinstance(callback, ExportableState):
                callback_name = type(callback).__name__
                if isinstance(trainer.state.stateful_callbacks.get(callback_name), list):
                    trainer.state.stateful_callbacks[callback_name].append(callback.state())
                else:
                    trainer.state.stateful_callbacks[callback_name] = callback.state()
        trainer.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

    trainer.accelerator.wait_for_everyone()  # every process has written its part
    if args.should_save:
        publish_dir(staging_dir, final_dir)
    trainer.accelerator.wait_for_everyone()

    if args.push_to_hub:
        trainer.create_model_card()
        trainer._push_from_checkpoint(final_dir)
    if args.should_save:
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )


# --------------------------------------------------------------------------------------- state beyond transformers
def save_flow_state(
    checkpoint_dir: str,
    *,
    micro_step: int,
    buffered_inputs: list[dict] | None,
    generate_every: int,
    process_index: int,
    num_processes: int,
    should_save: bool,
    ema: Any | None,
    algorithm: Any | None = None,
) -> None:
    """TRL's micro-step counter, the buffered generation batch (mid-buffer only; tensors as safetensors, one file
    per process), the EMA state and the algorithm's (`Algorithm.state_dict`)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    buffered = buffered_inputs is not None and micro_step % generate_every != 0
    if buffered:
        buffer = pack_buffer(buffered_inputs)
        if buffer is None:
            buffered = False
        else:
            path = os.path.join(checkpoint_dir, ROLLOUT_BUFFER_NAME.format(process=process_index))
            save_file(buffer[0], path, metadata=buffer[1])
    if should_save:
        state = {
            "format": 1,
            "micro_step": micro_step,
            "buffered_generation_batch": buffered,
            "num_processes": num_processes,
            "ema_num_updates": ema.num_updates if ema is not None else None,
        }
        if ema is not None:
            save_file(ema.state_dict(), os.path.join(checkpoint_dir, EMA_STATE_NAME))
        algorithm_state = algorithm.state_dict() if algorithm is not None else {}
        if algorithm_state:
            tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in algorithm_state.items()}
            save_file(tensors, os.path.join(checkpoint_dir, ALGORITHM_STATE_NAME))
        Path(checkpoint_dir, FLOW_STATE_NAME).write_text(json.dumps(state, indent=1))


def load_flow_state(
    checkpoint: str,
    *,
    process_index: int,
    num_processes: int,
    device: torch.device,
    ema: Any | None,
    algorithm: Any | None = None,
) -> tuple[int, list[dict] | None] | None:
    """Restore what `save_flow_state` wrote: ``(micro_step, buffered_inputs)``, the EMA and the algorithm's state
    loaded in place; None (and both restarted from the loaded weights) for a checkpoint without our state."""
    if algorithm is not None:
        algorithm_path = Path(checkpoint, ALGORITHM_STATE_NAME)
        if algorithm_path.is_file():
            algorithm.load_state_dict(load_file(str(algorithm_path), device=str(device)))
        else:
            if algorithm.state_dict():
                logger.warning(
                    f"{checkpoint} has no {ALGORITHM_STATE_NAME}: the algorithm's old policy / EMA restarts from "
                    "the loaded weights, so the resumed run may differ from an uninterrupted one"
                )
            algorithm.reset_state()
    path = Path(checkpoint, FLOW_STATE_NAME)
    if not path.is_file():
        logger.warning(
            f"{checkpoint} has no {FLOW_STATE_NAME}: TRL's buffered generation batch and the EMA are not restored, "
            "so the resumed run may differ from an uninterrupted one"
        )
        if ema is not None:
            ema.reset()
        return None
    state = json.loads(path.read_text())
    buffered_inputs = None
    if state["buffered_generation_batch"]:
        buffer_path = Path(checkpoint, ROLLOUT_BUFFER_NAME.format(process=process_index))
        if state["num_processes"] != num_processes or not buffer_path.is_file():
            logger.warning(
                f"{checkpoint} was saved inside a generation batch by {state['num_processes']} processes; with "
                f"{num_processes} now, the batch is regenerated and the run is not exact"
            )
        else:
            buffered_inputs = read_buffer(buffer_path, device)
    if ema is not None:
        ema_path = Path(checkpoint, EMA_STATE_NAME)
        if ema_path.is_file():
            ema.load_state_dict(load_file(str(ema_path)), state.get("ema_num_updates") or 0)
        else:
            logger.warning(f"{checkpoint} has no EMA state: the EMA restarts from the loaded weights")
            ema.reset()
    return state["micro_step"], buffered_inputs


def pack_buffer(batches: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """TRL's buffered generation batch (its ``steps_per_generation`` slices) as safetensors tensors + metadata.

    Slices are concatenated back into one tensor per key, so that `read_buffer` can rebuild them as views of one
    tensor at the same offsets as TRL's split: CPU kernels may round differently for differently aligned inputs,
    and an exact resume needs the very same bits."""
    tensors, kinds = {}, {}
    for name in batches[0]:
        values = [batch[name] for batch in batches]
        if all(value is None for value in values):
            kinds[name] = "none"
        elif all(isinstance(value, torch.Tensor) and value.ndim == 0 for value in values):
            kinds[name], tensors[name] = "scalar", values[0].detach().cpu().clone()
        elif all(isinstance(value, torch.Tensor) and value.ndim > 0 for value in values):
            kinds[name], tensors[name] = "split", torch.cat([value.detach().cpu() for value in values])
        else:
            logger.warning(
                f"the buffered generation batch holds {name!r} of a type that is not saved: a run resumed from "
                "this checkpoint regenerates the batch and is not exact"
            )
            return None
    metadata = {"num_batches": str(len(batches)), "kinds": json.dumps(kinds)}
    return tensors, metadata


def read_buffer(path: Path, device: torch.device) -> list[dict]:
    """The buffered generation batch written by `pack_buffer`, on ``device``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    num_batches = int(metadata["num_batches"])
    batches: list[dict] = [{} for _ in range(num_batches)]
    for name, kind in json.loads(metadata["kinds"]).items():
        if kind == "none":
            parts = [None] * num_batches
        elif kind == "scalar":
            parts = [tensors[name].to(device, copy=True)] * num_batches
        else:  # a fresh allocation: tensors read by safetensors may sit at any alignment
            whole = tensors[name].to(device, copy=True)
            size = whole.shape[0] // num_batches
            parts = [whole[i * size : (i + 1) * size] for i in range(num_batches)]
        for batch, part in zip(batches, parts, strict=True):
            batch[name] = part
    return batches


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle for epoch ``e`` depends on the seed and ``e`` only.

    TRL's sampler draws each epoch's permutation from one generator that advances with every pass, so a run
    resumed in epoch ``e`` (a new sampler) would replay epoch 0's order. `set_epoch` (which the Trainer calls before
    every pass, resumed or not) rewinds the generator to its seeded state and advances it by ``e`` permutations:
    the order of an uninterrupted run is unchanged and a resumed run gets the same one.
    """

    @classmethod
    def from_sampler(cls, sampler: RepeatSampler) -> EpochSeededRepeatSampler:
        """Take over a freshly built `RepeatSampler` (same data, counts, seed)."""
        new = cls.__new__(cls)
        new.__dict__.update(sampler.__dict__)
        new._initial_generator_state = new.generator.get_state() if new.shuffle else None
        return new

    def set_epoch(self, epoch: int) -> None:
        """Put the generator where an uninterrupted run has it at the start of epoch ``epoch``."""
        if self._initial_generator_state is None:
            return
        self.generator.set_state(self._initial_generator_state)
        for _ in range(epoch):  # RepeatSampler.__iter__ draws exactly one permutation per pass
            torch.randperm(self.num_samples, generator=self.generator)
