"""RL algorithms for flow-matching policies, behind one interface (`Algorithm`), chosen by ``algorithm`` in the
config. A new algorithm is one module here with an `Algorithm` subclass, registered in `ALGORITHMS`."""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .awm import AWM
from .base import CONDITIONING_PREFIX, Algorithm, LossStats, ReferenceDenoiser, conditioning_of
from .flow_grpo import FlowGRPO
from .grpo_guard import GRPOGuard
from .nft import DiffusionNFT

#: Algorithms by their ``algorithm`` config value.
ALGORITHMS: dict[str, type[Algorithm]] = {
    algorithm.name: algorithm for algorithm in (FlowGRPO, GRPOGuard, DiffusionNFT, AWM)
}


def build_algorithm(args: Any, adapter: Any) -> Algorithm:
    """The algorithm ``args.algorithm`` names, set up for this run."""
    if args.algorithm not in ALGORITHMS:
        raise UserInputError(f"unknown algorithm {args.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[args.algorithm](args, adapter)


def check_algorithm_args(args: Any) -> None:
    """``algorithm`` and ``sde_type`` name known ones that go together, ``noise_level`` suits the SDE, and the
    algorithm's own keys are valid (its ``check_args``)."""
    from ..sde import SDE_TYPES

    if args.algorithm not in ALGORITHMS:
        raise UserInputError(f"algorithm {args.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if args.sde_type not in SDE_TYPES:
        raise UserInputError(f"sde_type {args.sde_type!r} is not one of {', '.join(SDE_TYPES)}")
    supported = ALGORITHMS[args.algorithm].sde_types
    if supported is not None and args.sde_type not in supported:
        raise UserInputError(
            f"algorithm {args.algorithm} is derived for sde_type {' or '.join(supported)}, not {args.sde_type!r}"
        )
    if args.sde_type == "cps" and args.noise_level > 1:
        raise UserInputError(
            f"noise_level {args.noise_level} with sde_type cps: CPS's noise angle is noise_level * pi / 2, so "
            "noise_level must be in (0, 1] (official: 0.8)"
        )
    ALGORITHMS[args.algorithm].check_args(args)


__all__ = [
    "ALGORITHMS",
    "AWM",
    "CONDITIONING_PREFIX",
    "Algorithm",
    "DiffusionNFT",
    "FlowGRPO",
    "GRPOGuard",
    "LossStats",
    "ReferenceDenoiser",
    "build_algorithm",
    "check_algorithm_args",
    "conditioning_of",
]
