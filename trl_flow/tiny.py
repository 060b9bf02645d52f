"""Build a tiny, random-but-useful Stable Diffusion 3 pipeline offline.

The result is a directory that plain ``diffusers.StableDiffusion3Pipeline.from_pretrained(path)`` loads. It
is meant for tests, examples and CPU smoke runs of the Flow-GRPO trainer; nothing is downloaded.

What is inside:

* ``transformer``: a 2-layer :class:`~diffusers.SD3Transformer2DModel` (inner dim 64), randomly initialised
  from ``seed``. The RL trainer trains LoRA adapters on it.
* ``vae``: a small :class:`~diffusers.AutoencoderKL` with 4x spatial downsampling (32x32 RGB images <-> 4x8x8
  latents). A randomly initialised VAE decodes nearly every latent to the same flat image, which would hide
  the policy from any image reward, so the build trains it briefly (a few hundred seeded Adam steps, ~10 s on
  2 CPU cores) to reconstruct synthetic images: solid colours, two-colour gradients and coloured
  rectangles/discs on coloured backgrounds. ``scaling_factor``/``shift_factor`` are then set from the
  latent statistics so that ``(latents - shift_factor) * scaling_factor`` is roughly zero-mean, unit-variance
  (the space the diffusion model works in, as with SD3's VAE).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``shift=3.0`` (as SD3.5).
* ``text_encoder``/``text_encoder_2``: two small :class:`~transformers.CLIPTextModelWithProjection`
  (hidden sizes 32 and 48, like CLIP-L/CLIP-G in miniature) with :class:`~transformers.CLIPTokenizer`.
* ``text_encoder_3``: a small :class:`~transformers.T5EncoderModel` with :class:`~transformers.T5Tokenizer`.

The tokenizers are built here from a small English word list (colours, shapes, common prompt words). The CLIP
tokenizer is a byte-level BPE whose merges turn every listed word into a single token; other words fall back
to characters, so no input can fail to tokenize. The T5 tokenizer is a unigram model with one piece per
listed word plus single letters/digits/punctuation as fallback; anything else maps to ``<unk>``.

Usage::

    from diffusers import StableDiffusion3Pipeline
    from trl_flow.tiny import TINY_IMAGE_SIZE, TINY_MAX_SEQUENCE_LENGTH, ensure_tiny_sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(ensure_tiny_sd3())
    image = pipe(
        "a red square",
        height=TINY_IMAGE_SIZE,
        width=TINY_IMAGE_SIZE,
        num_inference_steps=4,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    ).images[0]
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from trl_flow.models.sd3 import SD3_ADALN_LORA_TARGETS, SD3Adapter

__all__ = [
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_CHANNELS",
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_SD3_VERSION",
    "build_tiny_sd3",
    "default_cache_dir",
    "ensure_tiny_sd3",
    "synthetic_images",
    "TINY_SD3_LORA_TARGETS",
]

TINY_SD3_VERSION: str = "1"
"""Version of the build recipe. Bump it whenever the recipe changes; it is part of the default cache dir."""

TINY_IMAGE_SIZE: int = 32
"""Default (and training) image height and width in pixels."""

TINY_MAX_SEQUENCE_LENGTH: int = 16
"""Recommended ``max_sequence_length`` (T5 tokens) for the tiny pipeline; the diffusers default is 256."""

TINY_LATENT_CHANNELS: int = 4
"""Channels of the VAE latents (= in/out channels of the transformer)."""

MARKER_FILE: str = ".complete"
"""Name of the file written last into a finished build directory."""

TINY_SD3_LORA_TARGETS: tuple[str, ...] = (
    *SD3Adapter.default_lora_target_modules,
    *SD3_ADALN_LORA_TARGETS,
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
)
"""LoRA targets of the tiny runs (recipes/tiny.yaml, tests, benchmarks): the paper's attention projections plus the
pooled-text -> AdaLN path, which carries the prompt most directly into a random tiny transformer (real SD3.5
recipes keep the attention-only targets)."""

_CACHE_ENV = "TRL_FLOW_CACHE"
_CLIP_MAX_LENGTH = 77  # the SD3 pipeline pads CLIP prompts to tokenizer.model_max_length
_VAE_DOWNSAMPLE = 4  # 2 ** (len(block_out_channels) - 1)

# Text encoder sizes. The pipeline concatenates the two CLIP hidden states (32 + 48 = 80), zero-pads them to
# the T5 width (96) and concatenates the pooled CLIP projections (32 + 48 = 80).
_CLIP_DIMS = (32, 48)
_T5_DIM = 96

# VAE training recipe (see _train_vae).
_VAE_TRAIN_STEPS = 400
_VAE_BATCH_SIZE = 16
_VAE_LR = 2e-3
_VAE_KL_WEIGHT = 1e-3
_VAE_COARSE_WEIGHT = 2.0
# Sanity checks run at the end of every build (failing them raises: a VAE that does not carry latents to
# pixels defeats the purpose of this module). Measured values are in the comments.
_MAX_SOLID_COLOUR_MAE = 0.1  # mean |reconstruction - image| on solid colours in [0, 1]; seeds 0-13: 0.019-0.030
_MIN_RANDOM_LATENT_DIFF = 0.05  # mean |decode(z1) - decode(z2)| in [0, 1]; seeds 0-13: 0.15-0.24

_PALETTE = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.0, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 1.0, 1.0),  # white
    (0.0, 0.0, 0.0),  # black
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
    (1.0, 0.5, 0.0),  # orange
    (0.5, 0.0, 0.5),  # purple
    (0.5, 0.5, 0.5),  # gray
    (0.55, 0.27, 0.07),  # brown
    (1.0, 0.75, 0.8),  # pink
)

_WORDS = """
a an the of on in with and or at to from by for over under above below behind next near into onto is are
it its this that some very no not one two three four five many few half
red green blue yellow white black orange purple pink brown gray grey cyan magenta violet gold golden silver
teal navy beige maroon olive lime turquoise indigo crimson scarlet color colors colour colours colored
coloured colorful colourful monochrome grayscale rainbow
bright dark light pale deep vivid vibrant saturated muted faded dull shiny glowing warm cool hot cold
big small large tiny huge little wide narrow tall short thick thin round square circle circles disc disk
dot dots rectangle rectangles triangle triangles stripe stripes striped line lines ring star heart shape
shapes block blocks box cube ball sphere pattern checkerboard grid border frame edge
solid plain simple smooth soft sharp blurry gradient flat textured empty filled uniform single double
left right top bottom center centre middle corner corners side upper lower background foreground
image images photo photograph picture painting drawing sketch illustration render art icon logo scene view
close up sky sun moon star stars cloud clouds sea ocean water lake river grass tree trees forest flower
flowers leaf leaves apple banana orange cherry lemon fire snow ice sand stone rock night day sunset sunrise
cat dog bird fish car house road city mountain field wall floor paper
high quality detailed beautiful realistic abstract minimal minimalist style
"""


# ---------------------------------------------------------------------------------------------------------
# paths


def default_cache_dir() -> pathlib.Path:
    """Return the default location of the tiny SD3 build.

    ``$TRL_FLOW_CACHE`` (or ``~/.cache/trl_flow`` when unset) joined with ``tiny-sd3-{TINY_SD3_VERSION}``.
    """
    root = os.environ.get(_CACHE_ENV) or os.path.join("~", ".cache", "trl_flow")
    return pathlib.Path(root).expanduser() / f"tiny-sd3-{TINY_SD3_VERSION}"


def _is_complete(path: pathlib.Path) -> bool:
    return (path / MARKER_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------
# tokenizers


def _vocab_words() -> list[str]:
    return sorted(set(_WORDS.split()))


def _train_bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until every word is a single symbol.

    Symbols follow the CLIP convention: the last character of a word carries the ``</w>`` suffix. Ties are
    broken by the pair itself, so the result is deterministic. Encoding a training word with these merges
    replays the training merges on it, hence yields exactly one token.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq[:-1], seq[1:], strict=True):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, seq in enumerate(seqs):
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def _build_clip_tokenizer():
    """A byte-level BPE :class:`~transformers.CLIPTokenizer` over the tiny word list."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    words = _vocab_words()
    merges = _train_bpe_merges(words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=_CLIP_MAX_LENGTH)
    bad = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"tiny CLIP tokenizer splits vocabulary words: {bad[:10]}")
    return tokenizer


def _build_t5_tokenizer():
    """A unigram :class:`~transformers.T5Tokenizer` with one piece per word of the tiny word list.

    A lowercasing normalizer would not survive ``save_pretrained``/``from_pretrained`` (the class rebuilds the
    backend from the vocabulary), so upper-case letters are single-character fallback pieces instead.
    """
    import string

    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -6.0)]
    pieces += [("\u2581" + w, -3.0) for w in _vocab_words()]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ---------------------------------------------------------------------------------------------------------
# models


def _build_text_encoders(clip_tokenizer, t5_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_encoders = []
    for dim in _CLIP_DIMS:
        config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=dim,
            intermediate_size=2 * dim,
            projection_dim=dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_CLIP_MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
        clip_encoders.append(CLIPTextModelWithProjection(config).eval())
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=2 * _T5_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
    )
    t5 = T5EncoderModel(t5_config).eval()
    return clip_encoders[0], clip_encoders[1], t5


def _build_transformer():
    from diffusers import SD3Transformer2DModel

    heads, head_dim = 4, 16
    return SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // _VAE_DOWNSAMPLE,
        patch_size=2,
        in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(_CLIP_DIMS),
        pos_embed_max_size=16,  # in patches: up to 16 * 2 * 4 = 128 pixels per side
        qk_norm="rms_norm",
    ).eval()


def _build_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 16, 16),
        layers_per_block=0,  # the mid blocks and decoder still have residual blocks
        act_fn="silu",
        latent_channels=TINY_LATENT_CHANNELS,
        # One group: per-channel group norm would erase the (spatially constant) colour of flat images.
        norm_num_groups=1,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        # Start with a small posterior std so that sampling noise does not swamp the untrained latents.
        vae.encoder.conv_out.weight[TINY_LATENT_CHANNELS:].mul_(0.1)
        vae.encoder.conv_out.bias[TINY_LATENT_CHANNELS:].fill_(-6.0)
    return vae


# ---------------------------------------------------------------------------------------------------------
# VAE training data and training


def _random_colours(n: int, generator: torch.Generator) -> torch.Tensor:
    palette = torch.tensor(_PALETTE, dtype=torch.float32)
    from_palette = palette[torch.randint(0, len(_PALETTE), (n,), generator=generator)]
    uniform = torch.rand(n, 3, generator=generator)
    use_palette = torch.rand(n, 1, generator=generator) < 0.5
    return torch.where(use_palette, from_palette, uniform)


def synthetic_images(n: int, generator: torch.Generator, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """Return ``n`` random synthetic RGB images in ``[0, 1]``, shape ``(n, 3, size, size)``.

    A quarter each: solid colours, linear two-colour gradients in a random direction, and a coloured
    rectangle or a coloured disc on a coloured background. These are the images the tiny VAE learns.
    """
    c1 = _random_colours(n, generator)[:, :, None, None]
    c2 = _random_colours(n, generator)[:, :, None, None]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    xs, ys = xs[None], ys[None]
    kind = torch.randint(0, 4, (n,), generator=generator)[:, None, None, None]

    angle = torch.rand(n, generator=generator)[:, None, None] * 2 * math.pi
    proj = (xs - 0.5) * torch.cos(angle) + (ys - 0.5) * torch.sin(angle)
    t = (proj / math.sqrt(2) + 0.5).clamp(0, 1)[:, None]
    gradient = c1 * (1 - t) + c2 * t

    lo = torch.rand(n, 2, generator=generator) * 0.6
    hi = lo + 0.2 + torch.rand(n, 2, generator=generator) * 0.4
    rect = (xs >= lo[:, 0, None, None]) & (xs <= hi[:, 0, None, None])
    rect = rect & (ys >= lo[:, 1, None, None]) & (ys <= hi[:, 1, None, None])
    centre = 0.25 + torch.rand(n, 2, generator=generator) * 0.5
    radius = 0.12 + torch.rand(n, generator=generator) * 0.25
    disc = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2

    solid = c1.expand(n, 3, size, size)
    shape = torch.where(kind == 2, rect[:, None], disc[:, None])
    shaped = torch.where(shape, c2, c1)
    return torch.where(kind == 0, solid, torch.where(kind == 1, gradient, shaped)).contiguous()


def _train_vae(vae, seed: int, steps: int = _VAE_TRAIN_STEPS) -> None:
    """Train ``vae`` in place to reconstruct :func:`synthetic_images` (pixels in ``[-1, 1]``)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=_VAE_LR, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=_VAE_LR, total_steps=steps, pct_start=0.1)
    latent_numel = TINY_LATENT_CHANNELS * (TINY_IMAGE_SIZE // _VAE_DOWNSAMPLE) ** 2
    vae.train()
    with torch.enable_grad():
        for _ in range(steps):
            x = synthetic_images(_VAE_BATCH_SIZE, generator) * 2 - 1
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
            err = recon - x
            kl = posterior.kl().mean() / latent_numel
            # The coarse term (error of 8x8-pixel averages) pulls every colour channel into place early.
            coarse = torch.nn.functional.avg_pool2d(err, 8).square().mean()
            loss = err.abs().mean() + err.square().mean() + _VAE_COARSE_WEIGHT * coarse + _VAE_KL_WEIGHT * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def _calibrate_vae(vae, seed: int) -> dict[str, float]:
    """Set ``scaling_factor``/``shift_factor`` from latent statistics; check the VAE; return the metrics."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = synthetic_images(512, generator) * 2 - 1
    latents = vae.encode(images).latent_dist.mode()
    shift = float(latents.mean())
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scale, 6), shift_factor=round(shift, 6))
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def decode01(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z / scale + shift).sample / 2 + 0.5).clamp(0, 1)

    palette = torch.tensor(_PALETTE, dtype=torch.float32)[:, :, None, None]
    solids = palette.expand(-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    solid_latents = (vae.encode(solids * 2 - 1).latent_dist.mode() - shift) * scale
    solid_mae = float((decode01(solid_latents) - solids).abs().mean())

    noise = torch.randn(32, TINY_LATENT_CHANNELS, *latents.shape[-2:], generator=generator)
    decoded = decode01(noise)
    random_diff = float((decoded[::2] - decoded[1::2]).abs().mean())
    metrics = {
        "scaling_factor": scale,
        "shift_factor": shift,
        "solid_colour_mae": solid_mae,
        "random_latent_diff": random_diff,
    }
    if solid_mae > _MAX_SOLID_COLOUR_MAE or random_diff < _MIN_RANDOM_LATENT_DIFF:
        raise RuntimeError(f"tiny SD3 VAE training failed its sanity check: {metrics}")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# build / install


def _build_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip_tokenizer = _build_clip_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    text_encoder, text_encoder_2, text_encoder_3 = _build_text_encoders(clip_tokenizer, t5_tokenizer)
    transformer = _build_transformer()
    vae = _build_vae()
    _train_vae(vae, seed)
    metrics = _calibrate_vae(vae, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    return pipe, metrics


@contextlib.contextmanager
def _file_lock(target: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock next to ``target`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _looks_like_build(path: pathlib.Path) -> bool:
    return _is_complete(path) or (path / "model_index.json").is_file() or not any(path.iterdir())


def _install(tmp: pathlib.Path, target: pathlib.Path, keep_complete: bool) -> None:
    """Atomically move the finished build ``tmp`` to ``target``.

    An existing ``target`` is replaced, unless ``keep_complete`` and it is a complete build (then ``tmp`` is
    discarded: another process won the race). A non-empty directory that does not look like a previous build
    is never replaced.
    """
    for _ in range(10):
        try:
            os.replace(tmp, target)  # atomic; succeeds when target is absent (or an empty directory)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if keep_complete and _is_complete(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not _looks_like_build(target):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"refusing to replace {target}: it is not a tiny SD3 build")
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not install the tiny SD3 build at {target}")


def save_build(
    target: pathlib.Path,
    build: Callable[[], tuple[Any, dict]],
    marker: dict,
    keep_complete: bool,
    metrics_key: str = "vae",
) -> pathlib.Path:
    """Save the pipeline ``build()`` returns as a complete build at ``target``; its metrics go into the marker
    under ``metrics_key``.

    Shared by the tiny builders of every family. The caller's global torch RNG state is left untouched. The folder
    is written next to ``target`` and renamed into place with the marker file ``marker`` written last, so readers
    never see a partial build (replacement rules: `_install`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would end up on the installed directory; os.mkdir honours umask.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with torch.random.fork_rng(devices=[]):
            pipe, metrics = build()
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER_FILE).write_text(json.dumps({**marker, metrics_key: metrics}, indent=2) + "\n")
        _install(tmp, target, keep_complete=keep_complete)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_build(target: pathlib.Path, build_into: Callable[[pathlib.Path], pathlib.Path]) -> pathlib.Path:
    """``target`` if it holds a complete build, else ``build_into(target)`` under a lock file next to it (the
    check is repeated under the lock, so concurrent callers build once)."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target):
        if _is_complete(target):
            return target
        return build_into(target)


def _build_into(target: pathlib.Path, seed: int, keep_complete: bool) -> pathlib.Path:
    marker = {"version": TINY_SD3_VERSION, "seed": seed}
    return save_build(target, lambda: _build_pipeline(seed), marker, keep_complete)


def build_tiny_sd3(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny SD3 pipeline and save it to ``output_dir``; return the directory as a path.

    The build is deterministic for a given ``seed`` (on a given machine/thread count), takes ~15 s on 2 CPU
    cores (mostly VAE training) and occupies ~3 MB. It is written into a temporary directory next to
    ``output_dir`` and renamed into place once complete, with the marker file :data:`MARKER_FILE` written
    last, so readers never see a partial build. An existing previous build (or empty directory) at
    ``output_dir`` is replaced; any other non-empty directory raises :class:`FileExistsError`. The caller's
    global torch RNG state is left untouched.
    """
    target = pathlib.Path(output_dir).expanduser().absolute()
    return _build_into(target, seed, keep_complete=False)


def ensure_tiny_sd3(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory of a complete tiny SD3 build at ``path``, building it (seed 0) if needed.

    ``path`` defaults to :func:`default_cache_dir`. A directory counts as complete when it contains the marker
    file; one without it is rebuilt. Concurrent callers are serialised by a lock file next to the directory
    where ``fcntl`` is available; without it they may build in parallel but never corrupt the result (the
    loser of the final rename uses the winner's build).
    """
    target = pathlib.Path(path if path is not None else default_cache_dir()).expanduser().absolute()
    return ensure_build(target, lambda folder: _build_into(folder, seed=0, keep_complete=True))
