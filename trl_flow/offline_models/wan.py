"""Build tiny Wan text-to-video pipelines offline: Wan2.1 (one transformer) and Wan2.2 A14B-style (two experts).

The results are folders that plain ``diffusers.WanPipeline.from_pretrained(path)`` loads; nothing is downloaded.
They exercise what the Wan adapter must get right: 5-D latents ``(B, 16, F', H', W')`` with the VAE's 4x temporal
and 8x spatial compression (``num_frames`` = 4k + 1), UMT5 text conditioning zero-padded to
``max_sequence_length``, two-pass CFG, the timestep on the 0-1000 scale, the per-channel ``latents_mean`` /
``latents_std`` of decoding and, for Wan2.2, the switch from ``transformer`` to ``transformer_2`` below
``boundary_ratio``.

What is inside (the transformer is diffusers' own test shape, ``tests/pipelines/wan/test_wan.py``):

* ``tokenizer``: a unigram :class:`~transformers.T5Tokenizer` with one piece per word of the offline word list plus
  the video words :data:`VIDEO_WORDS` (:func:`.build_t5_tokenizer`), i.e. word-level; Wan's real tokenizer is
  UMT5's T5 tokenizer too.
* ``text_encoder``: a 2-layer :class:`~transformers.UMT5EncoderModel` (d_model 32 = the transformer's
  ``text_dim``), random, dropout off.
* ``transformer`` (and for Wan2.2 ``transformer_2``, drawn separately, so the two experts differ): a 2-layer
  :class:`~diffusers.WanTransformer3DModel` (2 heads of 12, patch (1, 2, 2), ffn 32), random.
* ``vae``: an :class:`~diffusers.AutoencoderKLWan` with real Wan2.1 compression (temporal 4x, spatial 8x) and the
  real per-channel ``latents_mean``/``latents_std``, whose *decoder* is set by hand to pass colour through
  (:func:`_colour_transparent_decoder`): a random Wan decoder paints every latent the same flat grey (measured:
  per-frame colour std 0.0015 over random latents), and diffusers' test VAE (``base_dim`` 3, all ``dim_mult`` 1)
  narrows to one channel after its first upsampler, so no colour can reach the pixels at all. Here the first
  frame (which the causal VAE decodes alone, from latent frame 0) takes its colour from latent channels 0-2, and
  every later frame (frames 4k-3..4k from latent frame k) from channels 3-5: the decoder's first temporal upsampler,
  which runs on every latent frame but the first, reads channels 3-5. So a video whose colour changes over time is
  a prompt-dependent choice of latent channels. With one colour path for all frames the transformer must tell
  frames apart by their rotary positions alone (3 tokens, one per latent frame); in our runs that learned slower and
  less repeatably (0.1 to 3.6 standard errors in 60 updates across learning rates and LoRA targets). The encoder
  stays random (text-to-video never encodes).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with the static shift 3.0 of Wan's 480p T2V
  configs (diffusers' converter uses UniPC with ``flow_shift`` 3.0; trl-flow takes only the sigma grid, and Euler
  makes the plain pipeline's output the noise-level-0 rollout, which the tests compare).

Usage::

    from diffusers import WanPipeline
    from trl_flow.offline_models.wan import ensure_tiny_wan

    pipe = WanPipeline.from_pretrained(ensure_tiny_wan())
    frames = pipe("red turning blue", height=16, width=16, num_frames=9, num_inference_steps=4,
                  max_sequence_length=16).frames[0]
"""

from __future__ import annotations

import os
import pathlib

import torch

from .cache import SeededBuild
from .word_tokenizers import build_t5_tokenizer

__all__ = [
    "TINY_WAN_LORA_TARGETS",
    "TINY_WAN_VERSION",
    "VIDEO_WORDS",
    "build_tiny_wan",
    "build_tiny_wan22",
    "ensure_tiny_wan",
    "ensure_tiny_wan22",
]

TINY_WAN_VERSION: str = "3"
"""Version of both build recipes. Bump it whenever a recipe changes; it is part of the default cache dirs."""

VIDEO_WORDS: tuple[str, ...] = ("turning", "becoming", "fading", "changing", "then", "slowly", "quickly", "video")
"""Words the video prompts use beyond the shared word list, one token each in the tiny Wan tokenizer."""

TINY_WAN_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
    "proj_out",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "condition_embedder.time_proj",
)
"""LoRA targets of the tiny Wan's tests and recipe: the adapter's defaults (attention, feed-forward) plus the output
projection, the text projection and the timestep modulation, the paths that carry the prompt and the noise level
most directly in a random 2-layer model (measured on `color_transition`, 60 updates: the defaults alone rose 1.0
standard error, these 3.6)."""

_TEXT_DIM = 32
_FLOW_SHIFT = 3.0
_BOUNDARY_RATIO = 0.875  # diffusers' converter value for Wan2.2 T2V-A14B
# Gains that make word order reach the video (see _text_encoder and _transformer); measured on a random build, the
# velocity's change between "red turning blue" and "blue turning red" went from 0.2% of its norm to ~30%.
_POSITION_BIAS_GAIN = 20.0
_CROSS_KEY_GAIN, _CROSS_VALUE_GAIN = 4.0, 8.0


def _text_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    encoder = UMT5EncoderModel(config).eval()
    with torch.no_grad():
        # Wan's cross-attention has no text positions: it sees the set of contextual token states, so word order
        # ("red turning blue" vs "blue turning red") reaches the video only through context. A random encoder's
        # relative position bias is too weak to make context matter; a larger one makes each token's state depend
        # on its neighbours.
        for block in encoder.encoder.block:
            block.layer[0].SelfAttention.relative_attention_bias.weight.mul_(_POSITION_BIAS_GAIN)
    return encoder


def _transformer():
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    with torch.no_grad():
        # At random init cross-attention is near uniform over the text (its keys are RMS-normalised, so the gain
        # goes on the norm's weight) and its values are small: sharper and larger, so that the prompt moves the
        # velocity as in the other tiny families.
        for block in transformer.blocks:
            block.attn2.norm_k.weight.mul_(_CROSS_KEY_GAIN)
            block.attn2.to_v.weight.mul_(_CROSS_VALUE_GAIN)
    return transformer


def _identity_(conv: torch.nn.Module, gain: float = 1.0, bias: float = 0.0, source: int = 0, channels: int = 3) -> None:
    """Make a (causal 3-D or 2-D) convolution pass input channel ``source + c`` to output channel ``c`` (and to
    ``c + k * in_channels``, for a temporal upsampler's frame copies) for ``c < channels``: only
    the spatial centre and the current frame's tap (the last one of a causal kernel) are non-zero."""
    weight = conv.weight
    weight.zero_()
    out_channels, in_channels = weight.shape[:2]
    centre = [size // 2 for size in weight.shape[2:]]
    if weight.dim() == 5:
        centre[0] = weight.shape[2] - 1  # causal in time: the last tap is the current frame
    for out in range(out_channels):
        if out % in_channels < min(in_channels, channels):
            weight[(out, source + out % in_channels, *centre)] = gain
    if conv.bias is not None:
        conv.bias.fill_(bias)


def _colour_transparent_decoder(vae) -> None:
    """Set the VAE's decoder so that latent channels 0-2 become the first frame's colour, channels 3-5 the colour of
    every later frame.

    Residual branches and the attention's output projection are zeroed (each block is its skip connection), every
    other convolution copies its first three channels through (`_identity_`), and the output convolution maps the
    normalised features to [-1, 1] around a grey. The decoder's only non-linearities left are its final RMS norm
    (which keeps the direction of the colour vector) and SiLU.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    decoder = vae.decoder
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, WanResidualBlock):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if isinstance(module.conv_shortcut, torch.nn.Conv3d):
                    _identity_(module.conv_shortcut)
            elif isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()
        _identity_(vae.post_quant_conv, channels=6)  # the first and the later frames' colour channels
        _identity_(decoder.conv_in, channels=6)
        convs, time_convs = [], []
        for block in decoder.up_blocks:
            for upsampler in getattr(block, "upsamplers", None) or []:
                convs += [m for m in upsampler.resample.modules() if isinstance(m, torch.nn.Conv2d)]
                if hasattr(upsampler, "time_conv"):
                    time_convs.append(upsampler.time_conv)
        for conv in [*convs, *time_convs[1:]]:
            _identity_(conv)
        # The decoder's first temporal upsampler runs on every latent frame but the first (the causal VAE decodes
        # frame 0 alone): reading channels 3-5 there makes later frames take their colour from latent channels 3-5.
        _identity_(time_convs[0], source=3)
        _identity_(decoder.conv_out, gain=1.0, bias=-0.6)


def _vae():
    from diffusers import AutoencoderKLWan

    # dim_mult (1, 2, 2, 2): the narrowest decoder stage keeps 4 channels (diffusers' test VAE narrows to 1).
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    _colour_transparent_decoder(vae)
    return vae


def _colour_response(vae) -> float:
    """Std over random latents of the decoded per-frame mean colour: ~0 for a random decoder (a build check)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(torch.randn(8, 16, 3, 2, 2) * std + mean, return_dict=False)[0]
    return float(video.mean(dim=(3, 4)).std(dim=0).mean())


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=_FLOW_SHIFT)


def _build(seed: int, two_experts: bool):
    from diffusers import WanPipeline

    torch.manual_seed(seed)  # text encoder, transformer(s), VAE are drawn in this order
    tokenizer = build_t5_tokenizer(VIDEO_WORDS)
    text_encoder = _text_encoder(tokenizer)
    transformer = _transformer()
    transformer_2 = _transformer() if two_experts else None
    vae = _vae()
    response = _colour_response(vae)
    if response < 0.05:
        raise RuntimeError(f"tiny Wan VAE: decoded colour does not follow the latents (std {response:.4f})")
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=_scheduler(),
        transformer_2=transformer_2,
        boundary_ratio=_BOUNDARY_RATIO if two_experts else None,
    )
    return pipe, {"colour_response": response}


_WAN21 = SeededBuild("tiny-wan", TINY_WAN_VERSION, lambda seed: _build(seed, two_experts=False))
_WAN22 = SeededBuild("tiny-wan22", TINY_WAN_VERSION, lambda seed: _build(seed, two_experts=True))


def build_tiny_wan(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny Wan2.1 pipeline into ``output_dir`` (:meth:`.SeededBuild.build`); ~2 s on one CPU core."""
    return _WAN21.build(output_dir, seed)


def ensure_tiny_wan(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny Wan2.1 build at ``path`` (default ``tiny-wan-{version}`` in the cache),
    built (seed 0) if needed."""
    return _WAN21.ensure(path)


def build_tiny_wan22(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny two-expert Wan2.2 pipeline (``boundary_ratio`` 0.875) into ``output_dir``."""
    return _WAN22.build(output_dir, seed)


def ensure_tiny_wan22(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny two-expert Wan2.2 build at ``path`` (default ``tiny-wan22-{version}``)."""
    return _WAN22.ensure(path)
