"""The one interface between the trainer and an RL algorithm for flow-matching models.

The trainer owns what every algorithm shares: prompts, rollouts of the denoising chain, rewards, group advantages,
the optimizer step, checkpoints. An algorithm says:

* what a rollout must record (:attr:`Algorithm.rollout_record`): the per-step trajectory of the trained denoising
  steps with their log-probs (SDE policy-gradient methods: Flow-GRPO, GRPO-Guard), or only the final latents
  (methods that re-noise the clean sample themselves: DiffusionNFT, AWM);
* how it computes its loss on one micro-batch of that record, as a sum of *terms* (one per trained denoising step or
  training timestep), each a mean over the micro-batch's samples (:meth:`Algorithm.term_loss`), so that the trainer
  can backpropagate term by term (its default) and sample slice by sample slice (`train_micro_batch_size`) to save
  memory without the algorithm knowing;
* which metrics it logs (:meth:`Algorithm.metrics`).

Rollout batches are dicts of batch-first tensors, because TRL shuffles and splits every tensor of a generation batch
along dim 0. Keys the trainer always provides: ``advantages`` (B,) and the conditioning tensors prefixed ``cond_``;
with ``rollout_record == "trajectory"`` also ``latents``, ``next_latents`` (B, K, *latent), ``old_log_probs``,
``sigmas``, ``sigmas_next`` (B, K); with ``"trajectory_with_means"`` those and ``old_means`` (B, K, *latent), each
trained step's mean under the rollout policy; with ``"final_latents"``, ``final_latents`` (B, *latent). Latents may
have any rank (images (C, H, W), video (C, F, H, W)): every reduction is over all non-batch dimensions.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from ..models import FlowModelAdapter

CONDITIONING_PREFIX = "cond_"

#: ``reference(model)`` is a context manager yielding the reference policy's denoiser (no gradient).
ReferenceDenoiser = Callable[[Any], contextlib.AbstractContextManager]
#: What one micro-batch's loss terms append their diagnostics to: metric -> per-sample tensors.
LossStats = dict[str, list[torch.Tensor]]


def conditioning_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conditioning tensors stored in a rollout batch (without their ``cond_`` prefix)."""
    return {
        name[len(CONDITIONING_PREFIX) :]: tensor
        for name, tensor in batch.items()
        if name.startswith(CONDITIONING_PREFIX)
    }


class Algorithm(ABC):
    """An online-RL objective for a flow-matching policy, computed on recorded rollouts.

    Args:
        args: the run's `FlowGRPOConfig`.
        adapter: the model family's adapter (the only way to call the denoiser).
    """

    #: the ``algorithm`` config value that selects this class.
    name: ClassVar[str]
    #: what a training rollout records: the per-step ``"trajectory"`` (``"trajectory_with_means"``: with the step
    #: means) or only the ``"final_latents"``.
    rollout_record: ClassVar[Literal["trajectory", "trajectory_with_means", "final_latents"]] = "trajectory"
    #: the ``sde_type`` values the algorithm's objective is valid for (None: any).
    sde_types: ClassVar[tuple[str, ...] | None] = None
    #: whether the objective is derived without CFG (DiffusionNFT, AWM): training rollouts and passes then run at
    #: guidance 1 unless ``train_guidance_scale`` says otherwise.
    cfg_free: ClassVar[bool] = False

    def __init__(self, args: Any, adapter: FlowModelAdapter) -> None:
        self.args = args
        self.adapter = adapter
        #: the weight of the penalty towards the reference policy (GRPO's ``beta``; 0: no reference is used)
        self.beta = args.beta
        explicit = getattr(args, "train_guidance_scale", None)
        #: the CFG scale of training rollouts and training passes (evaluation keeps ``args.guidance_scale``)
        self.guidance_scale = explicit if explicit is not None else (1.0 if self.cfg_free else args.guidance_scale)

    @classmethod  # noqa: B027 (an optional hook)
    def check_args(cls, args: Any) -> None:
        """Validate the algorithm's own config keys (`check_algorithm_args` calls it): a `UserInputError` naming the
        key. Nothing to check by default."""

    @property
    def deterministic_rollout(self) -> bool:
        """Whether training rollouts are deterministic (ODE, ``noise_level`` unused): the algorithms that record only
        final latents re-noise them with the forward process themselves."""
        return self.rollout_record == "final_latents"

    # State beyond the trained weights (old policies, EMAs): the trainer binds the trained parameters once, calls
    # `after_optimizer_step` after every update and checkpoints `state_dict` (trl_flow.lifecycle).
    def bind(self, named_parameters: list[tuple[str, torch.nn.Parameter]]) -> None:  # noqa: B027 (an optional hook)
        """Called once by the trainer with the trained parameters (for algorithms that keep copies of them)."""

    def reset_state(self) -> None:  # noqa: B027 (an optional hook)
        """Restart any state kept beside the weights from the current weights (a resume without saved state)."""

    def after_optimizer_step(self, global_step: int) -> None:  # noqa: B027 (an optional hook)
        """Called after every optimizer update, ``global_step`` being the number of updates done."""

    def sampling_weights(self) -> contextlib.AbstractContextManager:
        """Within the block the policy holds the weights training rollouts sample with (default: its own)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors an exact resume needs beyond the trained weights (none by default)."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 (an optional hook)
        """Restore what `state_dict` returned."""

    @abstractmethod
    def num_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms a micro-batch has (trained denoising steps, training timesteps)."""

    def prepare(self, model: Any, batch: dict[str, torch.Tensor], reference: ReferenceDenoiser) -> list[dict] | None:
        """No-gradient quantities for the terms of a micro-batch (e.g. the reference's predictions), computed once
        before any term: one dict of batch-first tensors per term, or None. The trainer slices them with the
        samples when it splits the micro-batch."""
        return None

    @abstractmethod
    def term_loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        term: int,
        prepared: dict[str, torch.Tensor] | None,
        stats: LossStats,
    ) -> torch.Tensor:
        """The loss of term ``term``, averaged over the samples of ``batch``; diagnostics go into ``stats``."""

    @abstractmethod
    def metrics(self, stats: LossStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Metric name -> value of one micro-batch's ``stats`` (``gather`` collects a tensor from every process)."""

    def loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        reference: ReferenceDenoiser,
        accelerator: Any,
        gradient_accumulation_steps: int,
        backward_per_term: bool = False,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss (it has at least one term), the mean of its terms, divided for gradient
        accumulation (TRL's ``loss_is_scaled_for_ga``), and its metrics.

        With ``args.train_micro_batch_size`` or ``backward_per_term`` (and gradients on), each (term, sample slice)
        part is backpropagated as soon as it is computed, so only its activations are alive (the slice is the whole
        micro-batch without ``train_micro_batch_size``); the last part is returned for the Trainer's own backward
        pass. Parts are weighted by their share of the batch: gradients, loss and metrics equal those of the single
        pass. The trainer asks for ``backward_per_term`` by default (the official loop, too, backpropagates each
        denoising step): holding the graphs of all trained steps until one backward is what made its peak memory."""
        num_terms = self.num_terms(batch)
        batch_size = batch["advantages"].shape[0]
        scale = 1.0 / num_terms / gradient_accumulation_steps
        stats: LossStats = defaultdict(list)
        prepared = self.prepare(model, batch, reference)
        micro_batch_size = self.args.train_micro_batch_size
        if micro_batch_size is None and backward_per_term:
            micro_batch_size = batch_size
        if micro_batch_size is None or not torch.is_grad_enabled():
            total = sum(
                self.term_loss(model, batch, k, prepared[k] if prepared else None, stats) for k in range(num_terms)
            )
            return total * scale, self.metrics(stats, accelerator.gather)

        parts = [
            (k, slice(start, start + micro_batch_size))
            for k in range(num_terms)
            for start in range(0, batch_size, micro_batch_size)
        ]
        done = torch.zeros((), device=batch["advantages"].device)
        for index, (k, rows) in enumerate(parts):
            part = {name: tensor[rows] for name, tensor in batch.items()}
            part_prepared = {name: t[rows] for name, t in prepared[k].items()} if prepared else None
            is_last = index == len(parts) - 1
            with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
                part_loss = self.term_loss(model, part, k, part_prepared, stats)
                part_loss = part_loss * (part["advantages"].shape[0] / batch_size * scale)
                if not is_last:
                    accelerator.backward(part_loss)
                    done = done + part_loss.detach()
        return part_loss + done, self.metrics(stats, accelerator.gather)  # the whole loss's value, the last grad
