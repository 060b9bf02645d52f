"""trl-flow: Flow-GRPO for flow-matching text-to-image models, on top of TRL's GRPOTrainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Heavy imports (trl, diffusers) happen on first use, so `trl-flow --help` and reward servers start fast.
_EXPORTS = {
    "FlowGRPOConfig": "trl_flow.config",
    "FlowGRPOTrainer": "trl_flow.trainer",
    "FlowModelAdapter": "trl_flow.models",
    "UserInputError": "trl_flow.errors",
    "sde_step_with_logprob": "trl_flow.sde",
}

if TYPE_CHECKING:
    from .config import FlowGRPOConfig
    from .errors import UserInputError
    from .models import FlowModelAdapter
    from .sde import sde_step_with_logprob
    from .trainer import FlowGRPOTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_flow' has no attribute {name!r}")


__all__ = [
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "FlowModelAdapter",
    "UserInputError",
    "__version__",
    "sde_step_with_logprob",
]
