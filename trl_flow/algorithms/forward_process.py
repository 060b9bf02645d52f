"""What DiffusionNFT and AWM share: deterministic rollouts that keep only the final latents, a loss on those latents
re-noised by the forward process, and moving averages of the trained weights kept beside them.

Both papers train on ``x_t = (1 - t) x0 + t eps`` (``x0`` a rollout's final latent, ``eps`` fresh noise, ``t`` a
sigma of the sampler's own grid) against the flow-matching target ``eps - x0``, so a rollout needs no trajectory, no
log-prob and no SDE: any deterministic solver will do. Here it is the pipeline's Euler ODE (``noise_level`` is
unused; DiffusionNFT's official code uses a 2nd-order DPM solver, AWM's SA-Solver or the ODE in Flow-Factory).

The old/EMA policies are exponential moving averages of the trained parameters (`PolicyEMA`), not a second LoRA
adapter: the same code then serves LoRA and full fine-tuning, the average is one float32 copy of the trained
tensors (a LoRA's: small), and swapping it into the model for a no-gradient forward is an exact copy in and out.
The official schedule: ``decay = min(max, rate * (step - delay))`` (0 before ``delay``), applied once per rollout
batch (the papers' "epoch") with ``step`` the optimizer updates done.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..callbacks import ParameterEMA
from ..errors import UserInputError
from .base import Algorithm, conditioning_of


def decay_schedule(step: int, rate: float, maximum: float, delay: int = 0) -> float:
    """``min(maximum, rate * (step - delay))``, 0 before ``delay``: DiffusionNFT's ``decay_type`` 1 (rate 0.001,
    max 0.5) and 2 (rate 0.0075, max 0.999, delay 75), AWM's KL-EMA (rate 0.001, max 0.3, "linear")."""
    return 0.0 if step < delay else min(maximum, rate * (step - delay))


class PolicyEMA(ParameterEMA):
    """A `ParameterEMA` of the trained weights whose decay follows `decay_schedule` (``rate`` 0: a plain copy)."""

    def __init__(self, named_parameters, rate: float, maximum: float, delay: int = 0) -> None:
        self.rate, self.maximum, self.delay = rate, maximum, delay
        super().__init__(named_parameters, decay=maximum, update_every=1)

    def decay_at(self, step: int) -> float:
        return decay_schedule(step, self.rate, self.maximum, self.delay)


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process ``x_t = (1 - t) x0 + t eps`` with one ``t`` per sample."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    """The mean over every non-batch dimension (all losses are per-element means, as in the official code)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class ForwardProcessAlgorithm(Algorithm):
    """The part of DiffusionNFT and AWM that is the same: the record, the velocity call, the weight averages.

    Subclasses name their averages in `averages_to_keep` (name -> (rate, max, delay)) and use them with
    ``self.averages[name].applied()``."""

    rollout_record = "final_latents"
    cfg_free = True

    def __init__(self, args: Any, adapter: Any) -> None:
        super().__init__(args, adapter)
        self.averages: dict[str, PolicyEMA] = {}
        ga = max(1, getattr(args, "gradient_accumulation_steps", 1))
        per_generation = getattr(args, "steps_per_generation", None) or ga
        #: optimizer updates trained on one rollout batch (all passes): the averages move once per batch
        self.updates_per_generation = max(1, per_generation * getattr(args, "num_iterations", 1) // ga)

    @classmethod
    def check_schedule(cls, args: Any) -> None:
        """The shared keys: a decay schedule inside [0, 1), a positive number of training timesteps."""
        if args.train_timesteps is not None and args.train_timesteps < 1:
            raise UserInputError(f"train_timesteps = {args.train_timesteps}: use a number >= 1 (or unset it)")
        if args.policy_ema_decay_rate is not None and args.policy_ema_decay_rate < 0:
            raise UserInputError(f"policy_ema_decay_rate = {args.policy_ema_decay_rate}: use a rate >= 0")
        if args.policy_ema_decay_max is not None and not 0 <= args.policy_ema_decay_max < 1:
            raise UserInputError(f"policy_ema_decay_max = {args.policy_ema_decay_max}: use a decay in [0, 1)")
        if args.policy_ema_decay_delay < 0:
            raise UserInputError(f"policy_ema_decay_delay = {args.policy_ema_decay_delay}: use a step count >= 0")

    def policy_schedule(self, default_max: float) -> tuple[float, float, int]:
        """(rate, max, delay) of the config's `policy_ema_decay_*` keys, with this algorithm's official defaults."""
        args = self.args
        rate = 0.001 if args.policy_ema_decay_rate is None else args.policy_ema_decay_rate
        maximum = default_max if args.policy_ema_decay_max is None else args.policy_ema_decay_max
        return rate, maximum, args.policy_ema_decay_delay

    def averages_to_keep(self) -> dict[str, tuple[float, float, int]]:
        """The weight averages this run needs: name -> (rate, max, delay) of its decay schedule."""
        return {}

    # ------------------------------------------------------------------------------------- state beside weights
    def bind(self, named_parameters: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.parameters = list(named_parameters)
        self.averages = {
            name: PolicyEMA(named_parameters, *schedule) for name, schedule in self.averages_to_keep().items()
        }

    def reset_state(self) -> None:
        for average in self.averages.values():
            average.reset()

    def after_optimizer_step(self, global_step: int) -> None:
        if global_step % self.updates_per_generation == 0:  # a rollout batch is fully trained on
            for average in self.averages.values():
                average.update(global_step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, average in self.averages.items():
            state.update({f"{name}/{key}": tensor for key, tensor in average.state_dict().items()})
            state[f"{name}#num_updates"] = torch.tensor(average.num_updates)
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, average in self.averages.items():
            prefix = f"{name}/"
            own = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
            average.load_state_dict(own, int(tensors[f"{name}#num_updates"]))

    @contextlib.contextmanager
    def policy_term_only(self):
        """For `trl-flow doctor`: within the block the loss is the policy term alone (no KL terms), and every policy
        it compares to is computed by its own forward pass, even where it equals the current weights."""
        saved = dict(self.__dict__)
        self.beta = 0.0
        self.doctor_overrides()
        try:
            yield
        finally:
            self.__dict__.clear()
            self.__dict__.update(saved)

    def doctor_overrides(self) -> None:
        """What `policy_term_only` changes beyond ``beta`` (subclasses: their own KL weights and shortcuts)."""

    def applied(self, name: str) -> contextlib.AbstractContextManager:
        """The model holds average ``name`` within the block (the current weights if it is not kept)."""
        return self.averages[name].applied() if name in self.averages else contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------- the forward
    def num_terms(self, batch: dict[str, torch.Tensor]) -> int:
        return self.num_timesteps() if "final_latents" in batch else 0

    def num_timesteps(self) -> int:
        """Training timesteps per sample."""
        raise NotImplementedError

    def grid(self, device: torch.device) -> torch.Tensor:
        """The sampler's sigmas of a training rollout without the final 0: the timesteps the papers train on."""
        args = self.args
        return self.adapter.sigmas(args.num_inference_steps, args.height, args.width)[:-1].to(device).float()

    def velocity(self, denoiser: Any, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
        """The policy's velocity at ``(x_t, t)`` for the batch's conditioning, float32, at the training CFG."""
        return self.adapter.predict_velocity(denoiser, x_t, t, conditioning_of(batch), self.guidance_scale).float()

    def reference_velocities(self, model: Any, batch: dict, terms: list[dict], reference: Any) -> None:
        """``v_ref`` of every term, in one switch to the reference (PEFT walks the whole model to toggle it)."""
        if self.beta == 0.0:
            return
        with reference(model) as denoiser:
            for term in terms:
                term["v_ref"] = self.velocity(denoiser, batch, term["x_t"], term["t"])
