"""Where the frozen pipeline parts (VAE, text encoders) wait between uses: `offload_text_encoders`, `offload_vae`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Where offloaded frozen parts wait between uses.
OFFLOAD_DEVICE = torch.device("cpu")


class FrozenModules:
    """The adapter's frozen modules, frozen and placed: offloaded ones on the CPU except inside `in_use`.

    Args:
        modules: the frozen parts by attribute name (`FlowModelAdapter.frozen_modules`).
        device: the accelerator the denoiser runs on.
        offload_text_encoders / offload_vae: the config keys.
    """

    def __init__(
        self, modules: dict[str, torch.nn.Module], device: torch.device, offload_text_encoders: bool, offload_vae: bool
    ) -> None:
        self.modules = modules
        self.device = device
        self.offloaded = {
            name
            for name in modules
            if (offload_text_encoders and name.startswith("text_encoder")) or (offload_vae and name == "vae")
        }

    def place(self) -> None:
        """Each part on its resting device: the CPU if offloaded, else the accelerator."""
        for name, module in self.modules.items():
            module.to(OFFLOAD_DEVICE if name in self.offloaded else self.device)

    @contextlib.contextmanager
    def in_use(self, *prefixes: str) -> Iterator[None]:
        """Within the block, the offloaded parts whose names start with one of ``prefixes`` (all of them when none is
        given) sit on the accelerator; they go back to the CPU after it."""
        wanted = [
            module
            for name, module in self.modules.items()
            if name in self.offloaded and (not prefixes or name.startswith(prefixes))
        ]
        for module in wanted:
            module.to(self.device)
        try:
            yield
        finally:
            for module in wanted:
                module.to(OFFLOAD_DEVICE)
