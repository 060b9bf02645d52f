"""The experiment trackers ``report_to`` may name, and the check that each is installed."""

from __future__ import annotations

import importlib.util

from .errors import UserInputError

#: `report_to` trackers: the module transformers' callback imports, and how to install it.
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'trl-flow[tensorboard]'"),
    "wandb": ("wandb", "pip install 'trl-flow[wandb]'"),
    "trackio": ("trackio", "pip install trackio"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "clearml": ("clearml", "pip install clearml"),
    "neptune": ("neptune", "pip install neptune"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
}


def check_trackers_installed(report_to: list[str] | str | None) -> None:
    """Each tracker named in ``report_to`` is importable; else one error naming what to install.

    transformers finds out only when it builds the callback, with a traceback, after the run has started. Checked
    when a trainer is built (not when a config is parsed: a recipe names its trackers for the machine it runs on)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in TRACKER_PACKAGES:
            continue
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserInputError(
                f"report_to: {name} needs the {module!r} package, which is not installed: {install}, or remove "
                f"{name} from report_to"
            )
