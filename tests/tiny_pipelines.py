"""Tiny random-weight diffusers pipelines, built with diffusers' and transformers' own classes and
saved to a local directory, as diffusers' own test suite builds them (nothing is downloaded)."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch

SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler")


def tiny_clip_tokenizer(directory: Path, max_length: int = 16):
    """A CLIPTokenizer over single characters (every word split into letters, ``</w>`` on the last),
    written as the vocab.json + merges.txt a real CLIP tokenizer has."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def save_tiny_stable_diffusion(directory: Path, *, prediction_type: str = "epsilon", spacing: str = "trailing",
                               scheduler: str = "DDIMScheduler", steps_offset: int = 0, sample_size: int = 8,
                               seed: int = 0) -> Path:
    """A StableDiffusionPipeline with a 2-level UNet (4, 8 channels), a 2-level AutoencoderKL and a
    2-layer CLIP text encoder, random weights from ``seed``, saved with safetensors to ``directory``.
    Images are ``sample_size * 2`` pixels square (the autoencoder halves them once)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    tokenizer = tiny_clip_tokenizer(Path(directory) / "_tokenizer_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length))
    options = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset)
    if scheduler == "DDIMScheduler":
        options.update(clip_sample=False, set_alpha_to_one=True)
    elif scheduler == "PNDMScheduler":
        options.update(skip_prk_steps=True, set_alpha_to_one=False)
    sched = getattr(diffusers, scheduler)(**options)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    import shutil

    shutil.rmtree(Path(directory) / "_tokenizer_src")
    return Path(directory)


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5 tokenizer (a sentencepiece-style Unigram model over single letters and ``▁``-prefixed
    letters, ``</s>`` appended) built with the tokenizers library, as T5/UMT5 tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits
    pieces = ["▁", *chars, *".,!?'-", *("▁" + c for c in chars)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((p, -1.0 - 0.01 * i) for i, p in enumerate(pieces))]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)


def save_tiny_wan(directory: Path, *, scheduler: str = "UniPCMultistepScheduler", shift: float = 3.0,
                  seed: int = 0) -> Path:
    """A WanPipeline as diffusers' own tests build it: a 2-layer WanTransformer3DModel (patch 1x2x2, 16
    latent channels), an AutoencoderKLWan (8x spatial, 4x causal temporal compression) and a 2-layer
    UMT5 encoder, random weights from ``seed``; ``scheduler`` FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler (flow sigmas, Wan 2.1's shipped choice) or DPMSolverMultistepScheduler
    (flow sigmas), with ``shift``."""
    from diffusers import (
        AutoencoderKLWan,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    if scheduler == "FlowMatchEulerDiscreteScheduler":
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif scheduler == "DPMSolverMultistepScheduler":
        sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    else:
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=sched)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def save_tiny_stable_audio(directory: Path, *, scheduler: str = "EDMDPMSolverMultistepScheduler", seed: int = 0,
                           sample_size: int = 32) -> Path:
    """A StableAudioPipeline as diffusers' own tests build it: a 2-layer StableAudioDiTModel over 4 latent
    channels (``sample_size`` latent positions), a stereo AutoencoderOobleck at 1 kHz compressing 4x (so the
    window is 0.128 s), a 2-layer T5 encoder and the projection model (seconds 0-1), random weights from ``seed``; ``scheduler``
    EDMDPMSolverMultistepScheduler (the pipeline's annotated one) or CosineDPMSolverMultistepScheduler
    (what stable-audio-open-1.0 ships), both with Stable Audio's settings (v-prediction, sigma_data 1,
    exponential grid from 500 to 0.3)."""
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = StableAudioDiTModel(
        sample_size=sample_size, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=4, time_proj_dim=8,
        global_states_input_dim=8, cross_attention_input_dim=4)
    vae = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[1, 2, 2], decoder_channels=3,
                             decoder_input_channels=4, audio_channels=2, channel_multiples=[2, 4, 6],
                             sampling_rate=1000)
    tokenizer = tiny_t5_tokenizer(max_length=16)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    projection = StableAudioProjectionModel(text_encoder_dim=8, conditioning_dim=4, min_value=0, max_value=1)
    settings = dict(sigma_min=0.3, sigma_max=500, sigma_data=1.0, sigma_schedule="exponential",
                    prediction_type="v_prediction", solver_order=2, final_sigmas_type="zero")
    if scheduler == "CosineDPMSolverMultistepScheduler":
        sched = CosineDPMSolverMultistepScheduler(**settings)
    else:
        sched = EDMDPMSolverMultistepScheduler(**settings, algorithm_type="dpmsolver++")
    pipe = StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection, tokenizer=tokenizer,
                               transformer=transformer, scheduler=sched)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def copy_pipeline(src: Path, tmp_path: Path) -> Path:
    """A copy of a saved pipeline directory to damage."""
    return Path(shutil.copytree(src, tmp_path / "copy"))


def edit_json(file: Path, **changes) -> None:
    """Set keys of a JSON file (a pipeline's index or a part's config)."""
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))
