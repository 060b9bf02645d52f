"""The flow-matching scheduler of the tiny FLUX and Qwen-Image builds (the tiny SD3's is a plain shifted one)."""

from __future__ import annotations

__all__ = ["dynamic_shift_scheduler"]


def dynamic_shift_scheduler(shift: float, max_shift: float, max_image_seq_len: int, **options):
    """A 1000-step :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with dynamic (resolution-dependent) shifting
    from ``base_shift`` 0.5 at 256 image tokens to ``max_shift`` at ``max_image_seq_len``, as FLUX.1-dev's and
    Qwen-Image's are configured; ``options`` are further config values (e.g. Qwen-Image's ``shift_terminal``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=shift,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=max_shift,
        base_image_seq_len=256,
        max_image_seq_len=max_image_seq_len,
        **options,
    )
