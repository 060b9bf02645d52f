"""RL algorithms for flow-matching policies, behind one interface (`Algorithm`), chosen by ``algorithm`` in the
config. A new algorithm is one module here with an `Algorithm` subclass, registered in `ALGORITHMS`."""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import CONDITIONING_PREFIX, Algorithm, LossStats, ReferenceDenoiser, conditioning_of
from .flow_grpo import FlowGRPO

#: Algorithms by their ``algorithm`` config value.
ALGORITHMS: dict[str, type[Algorithm]] = {FlowGRPO.name: FlowGRPO}


def build_algorithm(args: Any, adapter: Any) -> Algorithm:
    """The algorithm ``args.algorithm`` names, set up for this run."""
    if args.algorithm not in ALGORITHMS:
        raise UserInputError(f"unknown algorithm {args.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[args.algorithm](args, adapter)


__all__ = [
    "ALGORITHMS",
    "CONDITIONING_PREFIX",
    "Algorithm",
    "FlowGRPO",
    "LossStats",
    "ReferenceDenoiser",
    "build_algorithm",
    "conditioning_of",
]
