"""A real StableDiffusion3Pipeline made of tiny random components, built offline (test helper).

Two tiny CLIP text encoders with byte-level tokenizers written here (no hub files), a 1-layer
SD3Transformer2DModel, a one-level AutoencoderKL and the stock FlowMatchEulerDiscreteScheduler(shift=3);
T5 is left out (the SD3 pipeline then pads with zeros of width joint_attention_dim). Images are 16x16 RGB,
latents 4x8x8; building and one 4-step call take well under a second on CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

CLIP_HIDDEN = 16        # each CLIP's hidden size; the pipeline concatenates two -> 32 = joint_attention_dim
CLIP_PROJECTION = 16    # pooled width of each CLIP; concatenated -> pooled_projection_dim 32
JOINT_DIM = 2 * CLIP_HIDDEN  # stands in for T5's width (zeros when text_encoder_3 is None)
MAX_TOKENS = 16         # tokenizer.model_max_length = CLIP context length
LATENT_CHANNELS = 4
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def tiny_clip_tokenizer():
    """CLIPTokenizer whose vocab is every byte-level character, alone and word-final; no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *chars, *(c + "</w>" for c in chars)])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_clip_text_encoder(vocab_size: int, bos_id: int, eos_id: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=CLIP_PROJECTION, bos_token_id=bos_id, eos_token_id=eos_id,
                            pad_token_id=eos_id, hidden_act="gelu")
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_PROJECTION, pos_embed_max_size=8)
    torch.manual_seed(seed + 1)
    # Two resolution levels -> vae_scale_factor 2: 16x16 images <-> 8x8 latents. SD3's VAE has no quant convs.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=16,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL))
    return dict(
        transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip_text_encoder(len(tokenizer), bos, eos, seed + 2), tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(len(tokenizer), bos, eos, seed + 3), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


def build_tiny_sd3_pipeline(directory, seed: int = 0) -> Path:
    """Save a tiny random StableDiffusion3Pipeline to `directory` (loadable with from_pretrained, offline)."""
    from diffusers import StableDiffusion3Pipeline

    directory = Path(directory)
    StableDiffusion3Pipeline(**tiny_sd3_components(seed)).save_pretrained(directory)
    return directory


def load_tiny_sd3_pipeline(directory):
    """Load it back; diffusers needs the absent T5 named explicitly (`text_encoder_3=None, tokenizer_3=None`)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)
