"""Weights files for the model tests, written byte by byte as the safetensors format says
(8-byte header length, JSON header, data): tiny tensors under the real key names of SD 1.5
and SDXL single-file checkpoints (the original LDM layout ComfyUI keeps), an SD 1.5 LCM-LoRA,
and diffusers components, with the real shapes only where a family is told from them. And
the files of hub repos shaped like the real ones (a diffusers pipeline with fp16 and full
weights, .bin files and a root checkpoint beside them; a LoRA repo)."""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

ITEMSIZE = {"F16": 2, "F32": 4, "BF16": 2}

SD15_CHECKPOINT = {
    "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, 4, 3, 3]),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768]),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": ("F16", [4, 4, 1, 1]),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": ("F16", [77, 8]),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ("F16", [16, 8]),
    "first_stage_model.decoder.conv_in.weight": ("F16", [8, 4, 3, 3]),
    "first_stage_model.encoder.conv_out.weight": ("F16", [8, 8, 3, 3]),
}
SDXL_CHECKPOINT = {
    "model.diffusion_model.input_blocks.0.0.weight": ("F16", [320, 4, 3, 3]),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [640, 2048]),
    "model.diffusion_model.label_emb.0.0.weight": ("F16", [4, 2816]),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": ("F16", [77, 8]),
    "conditioner.embedders.1.model.positional_embedding": ("F16", [77, 8]),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": ("F16", [8]),
    "first_stage_model.decoder.conv_in.weight": ("F16", [8, 4, 3, 3]),
}
# latent-consistency/lcm-lora-sdv1-5's file is in the kohya layout: lora_unet_* keys
SD15_LORA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": ("F16", []),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": ("F16", [64, 768]),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": ("F16", [320, 64]),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F16", [64, 320, 1, 1]),
}
UNET_FP16 = {
    "conv_in.weight": ("F16", [320, 4, 3, 3]),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768]),
    "down_blocks.0.resnets.0.conv1.weight": ("F16", [320, 320, 3, 3]),
}
VAE_FP16 = {"decoder.conv_in.weight": ("F16", [512, 4, 3, 3]),
            "encoder.conv_in.weight": ("F16", [128, 3, 3, 3])}
TEXT_FP16 = {"text_model.embeddings.token_embedding.weight": ("F16", [1024, 768]),
             "text_model.embeddings.position_embedding.weight": ("F16", [77, 768])}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], seed: int = 1) -> bytes:
    """A valid safetensors file: each tensor's bytes a pattern of `seed` (never all zero, so
    two files with the same keys differ)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    block = bytes((seed * 31 + i * 7) % 251 for i in range(4096))
    data = (block * (offset // len(block) + 1))[:offset]
    return struct.pack("<Q", len(raw)) + raw + data


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_bytes(tensors, seed))
    return path


SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]}


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()


def sd15_pipeline_files() -> dict[str, bytes]:
    """stable-diffusion-v1-5/stable-diffusion-v1-5's layout in small: what pull must take
    (model_index, configs, tokenizer, fp16 safetensors) and what it must leave (full-precision
    and non-EMA weights, .bin files, the safety checker, the root single-file checkpoint)."""
    files = {
        "model_index.json": _json(SD15_MODEL_INDEX),
        "README.md": b"# stand-in\n", ".gitattributes": b"*.safetensors filter=lfs\n",
        "feature_extractor/preprocessor_config.json": _json({"crop_size": 224}),
        "scheduler/scheduler_config.json": _json({"_class_name": "PNDMScheduler",
                                                  "steps_offset": 1}),
        "tokenizer/vocab.json": _json({"a</w>": 0, "<|endoftext|>": 1}),
        "tokenizer/merges.txt": b"#version: 0.2\na b\n",
        "tokenizer/tokenizer_config.json": _json({"model_max_length": 77}),
        "tokenizer/special_tokens_map.json": _json({"eos_token": "<|endoftext|>"}),
        "text_encoder/config.json": _json({"hidden_size": 768}),
        "unet/config.json": _json({"_class_name": "UNet2DConditionModel",
                                   "cross_attention_dim": 768, "in_channels": 4}),
        "vae/config.json": _json({"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}),
        "safety_checker/config.json": _json({"_class_name": "StableDiffusionSafetyChecker"}),
        "unet/diffusion_pytorch_model.fp16.safetensors": safetensors_bytes(UNET_FP16, 2),
        "vae/diffusion_pytorch_model.fp16.safetensors": safetensors_bytes(VAE_FP16, 3),
        "text_encoder/model.fp16.safetensors": safetensors_bytes(TEXT_FP16, 4),
        # left on the hub by pull
        "unet/diffusion_pytorch_model.safetensors": safetensors_bytes(UNET_FP16, 5),
        "unet/diffusion_pytorch_model.non_ema.safetensors": safetensors_bytes(UNET_FP16, 6),
        "unet/diffusion_pytorch_model.bin": b"\x80\x02pickle" * 64,
        "vae/diffusion_pytorch_model.safetensors": safetensors_bytes(VAE_FP16, 7),
        "text_encoder/model.safetensors": safetensors_bytes(TEXT_FP16, 8),
        "safety_checker/model.fp16.safetensors": safetensors_bytes(TEXT_FP16, 9),
        "v1-5-pruned-emaonly.safetensors": safetensors_bytes(SD15_CHECKPOINT, 10),
    }
    return files


SD15_PULLED = sorted([
    "model_index.json", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
    "text_encoder/config.json", "unet/config.json", "vae/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors"])


def lora_files() -> dict[str, bytes]:
    return {"pytorch_lora_weights.safetensors": safetensors_bytes(SD15_LORA, 11),
            "README.md": b"# LCM-LoRA stand-in\n", ".gitattributes": b""}


def big_checkpoint_bytes(mib: int = 24, seed: int = 12) -> bytes:
    """An SD 1.5 single-file checkpoint of about `mib` MiB: larger than huggingface_hub's
    10 MiB download chunk, so an interrupted download leaves bytes on disk."""
    rows = mib * 1024 * 1024 // (2048 * 2)
    tensors = {**SD15_CHECKPOINT,
               "model.diffusion_model.middle_block.1.proj_out.weight": ("F16", [rows, 2048])}
    return safetensors_bytes(tensors, seed)
