"""Build the mini SD3 pipeline: ``python -m trl_flow.mini.build --output DIR [--seed 0] [--threads N]``.

With the defaults this reproduces the shipped ``trl_flow/mini/pretrained`` (bit for bit only on the same kind of
machine and thread count: float summation order differs elsewhere). Prints progress and the build's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from trl_flow.offline_models.mini_geneval import MARKER_FILE, MiniBuildConfig, build_mini_sd3


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m trl_flow.mini.build", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write the diffusers pipeline into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    defaults = MiniBuildConfig()
    for f in fields(MiniBuildConfig):
        kind = type(getattr(defaults, f.name))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=_parse_bool if kind is bool else kind, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in fields(MiniBuildConfig) if getattr(args, f.name) is not None}
    config = MiniBuildConfig(**overrides)
    path = build_mini_sd3(args.output, seed=args.seed, config=config, log=lambda line: print(line, flush=True))
    print(json.dumps(json.loads((path / MARKER_FILE).read_text()), indent=2))
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
