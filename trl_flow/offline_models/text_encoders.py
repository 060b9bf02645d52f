"""Small random text encoders of the offline models, sized to the tokenizers of :mod:`.word_tokenizers`.

They are never trained: a random encoder still maps different prompts to different embeddings, which is all a
tiny diffusion model needs to be prompt-conditional. Each is built from the global torch RNG (the callers seed it),
in the order the callers ask for them.
"""

from __future__ import annotations

from .word_tokenizers import CLIP_MAX_LENGTH, QWEN_SPECIAL_TOKENS

__all__ = ["clip_text_encoder", "qwen_text_encoder", "t5_encoder"]


def clip_text_encoder(tokenizer, hidden_size: int, with_projection: bool):
    """A 2-layer CLIP text encoder of width ``hidden_size`` (4 heads), in eval mode.

    ``with_projection``: a :class:`~transformers.CLIPTextModelWithProjection` projecting to ``hidden_size`` (SD3
    uses the pooled projection), else a :class:`~transformers.CLIPTextModel` (FLUX uses its pooled output). It has
    77 positions whatever ``tokenizer.model_max_length`` is, so a shorter-padding tokenizer can share it.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # CLIPTextModel has no projection; its config keeps the default projection_dim (as the FLUX build always did).
    projection = {"projection_dim": hidden_size} if with_projection else {}
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        **projection,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def t5_encoder(tokenizer, d_model: int):
    """A 2-layer :class:`~transformers.T5EncoderModel` of width ``d_model`` (4 heads of 16), in eval mode."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def qwen_text_encoder(tokenizer, hidden_size: int):
    """A 2-layer :class:`~transformers.Qwen2_5_VLForConditionalGeneration` of width ``hidden_size`` (M-RoPE, a 1-block
    vision tower that text-to-image never runs), in eval mode; ``tokenizer`` is :func:`.build_qwen_tokenizer`'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            # M-RoPE: the head dim's 8 rotary frequencies split over (time, height, width) positions
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()
