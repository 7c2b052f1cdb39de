"""Tiny Stable Diffusion models of the real architecture with random weights, saved in the
layouts users have on disk, for the diffusion backend's tests and bench/diffusion.py:

    tiny_parts(...)            UNet, VAE, text encoder and scheduler, built from configs like
                               diffusers' own get_dummy_components (research note §2.1)
    save_folder(dir, parts)    a diffusers folder (what from_pretrained / the HF cache hold)
    save_skeleton(dir, parts)  its configs only (what diffusion.config_dir points at)
    save_ldm(path, parts)      ONE .safetensors in the original (CompVis/LDM) key layout, the
                               layout of a ComfyUI models/checkpoints file, written by mapping
                               diffusers' keys (diffusers ships only the LDM -> diffusers way)
    save_lora(path, ...)       an LCM-LoRA-like file (peft/diffusers layout) for a UNet
    full_sd15_parts()          the real SD 1.5 sizes, random weights, built on the meta device

The UNet mapping generalises diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
to any number of levels (which levels have attention is read from the block types).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreamd.backends.diffusion import load as diffusion_load

VOCAB = 49408        # the real CLIP vocabulary: dreamd's tokenizer makes ids up to 49407
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                 in_channels=4, out_channels=4, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8)
# four levels: an 8x VAE, like the real one (dreamd's codecs and TAESD assume 8x)
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
TINY_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                 num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=VOCAB,
                 max_position_embeddings=77, projection_dim=32)


def tiny_parts(seed: int = 0, *, lcm: bool = False) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET, **({"time_cond_proj_dim": 256} if lcm else {}))
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)
    with torch.no_grad():       # default init leaves norms at 1/0: noise makes every weight count
        for model in (unet, vae):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(),
            "scheduler": scheduler}


def save_skeleton(folder: Path, parts: dict) -> Path:
    """The configs a single-file load needs, like dreamd's shipped skeletons."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(diffusion_load.skeleton_dir("sd15") / "model_index.json", folder)
    parts["unet"].save_config(folder / "unet")
    parts["vae"].save_config(folder / "vae")
    parts["scheduler"].save_config(folder / "scheduler")
    parts["text_encoder"].config.save_pretrained(folder / "text_encoder")
    return folder


def save_folder(folder: Path, parts: dict, *, tokenizer: bool = True) -> Path:
    """A diffusers folder, as save_pretrained (and the HF hub) lay it out."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from dreamd.backends.diffusion.tokenizer import clip_tokenizer

    pipe = StableDiffusionImg2ImgPipeline(**parts, tokenizer=clip_tokenizer("sd15"),
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    if not tokenizer:
        shutil.rmtree(folder / "tokenizer")
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("tokenizer", None)
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_hub_snapshot(cache: Path, hub_id: str, parts: dict | None = None,
                      lora: Path | None = None) -> Path:
    """`hub_id` in an HF cache laid out as huggingface_hub does: refs/main -> a commit,
    snapshots/<commit>/ with the files (links to blobs/ on the real cache; copies here)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if parts is not None:
        save_folder(snap, parts)
    if lora is not None:
        snap.mkdir(parents=True, exist_ok=True)
        shutil.copy(lora, snap / "pytorch_lora_weights.safetensors")
    return snap


# ---------------------------------------------------------------- the LDM layout

_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
           ("skip_connection", "conv_shortcut")]
_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM (model.diffusion_model.*) keys."""
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    n, per = len(down_attn), config.layers_per_block
    prefixes: list[tuple[str, str]] = []       # (ldm, diffusers)
    for i in range(n):
        for j in range(per):
            prefixes.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                prefixes.append((f"input_blocks.{(per + 1) * i + j + 1}.1.",
                                 f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            prefixes.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.",
                             f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(per + 1):
            prefixes.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                prefixes.append((f"output_blocks.{(per + 1) * i + j}.1.",
                                 f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            prefixes.append((f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}.",
                             f"up_blocks.{i}.upsamplers.0."))
    prefixes.append(("middle_block.1.", "mid_block.attentions.0."))
    prefixes += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    out = {}
    for key, value in sd.items():
        new = key
        for ldm, hf in _TOP:
            if new.startswith(hf):
                new = ldm + new[len(hf):]
        if "resnets" in new:
            for ldm, hf in _RESNET:
                new = new.replace(hf, ldm)
        for ldm, hf in prefixes:
            if new.startswith(hf):
                new = ldm + new[len(hf):]
                break
        out[new] = value
    return out


def ldm_state_dict(parts: dict) -> dict[str, torch.Tensor]:
    from dreamd.latent.weights import diffusers_vae_to_ldm

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in diffusers_vae_to_ldm(vae.state_dict()).items()})
    # the original files name CLIP's weights as transformers 4 did: text_model.<...>
    sd.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else
                                                  f"text_model.{k}"): v
               for k, v in text.state_dict().items()})
    return sd


def save_ldm(path: Path, parts: dict, dtype: torch.dtype | None = None) -> Path:
    sd = ldm_state_dict(parts)
    save_file({k: (v.to(dtype) if dtype is not None else v).detach().contiguous()
               for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------- a LoRA

def save_lora(path: Path, unet, rank: int = 4, seed: int = 1, scale: float = 0.05) -> Path:
    """A LoRA on the UNet's attention projections, in the layout diffusers saves
    (unet.<module>.lora_A/B.weight), with small random weights that do change the output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v"):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
    save_file(sd, str(path))
    return path


# ---------------------------------------------------------------- the real size

def full_sd15_parts(seed: int = 0) -> dict:
    """SD 1.5's UNet, VAE and text encoder from dreamd's shipped skeleton, random weights:
    built on the meta device (no 4 GB of init), then given storage and filled with noise."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    skel = diffusion_load.skeleton_dir("sd15")
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(skel / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(skel / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(skel / "text_encoder"))
    parts = {}
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.copy_(torch.ones_like(p) if pname.endswith("weight") else torch.zeros_like(p))
                else:
                    p.normal_(0.0, 0.02, generator=g)
            for bname, b in model.named_buffers():
                if "position_ids" in bname:
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        parts[name] = model.eval()
    from diffusers import EulerDiscreteScheduler
    parts["scheduler"] = EulerDiscreteScheduler.from_pretrained(skel / "scheduler")
    return parts
