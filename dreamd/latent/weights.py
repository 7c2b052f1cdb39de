"""From a weight file on disk to validated tensors in our modules' layout (the codecs' loader).

Reads `.safetensors` and `.ckpt`/`.pth`/`.pt` (torch.load with weights_only=True: a weight
file never runs code), recognises the layouts found in the wild, converts the keys, and
checks every key and shape against the architecture before anything is built: a file is
loaded whole or refused with a CodecError that names the file and what is wrong.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dreamd.errors import CodecError
from dreamd.latent import autoencoder_kl as kl
from dreamd.latent import taesd

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
# Training leftovers some released VAE files carry (the ft-MSE .ckpt has the two EMA
# counters; ldm training checkpoints carry the discriminator): not weights of the model.
IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates"}
IGNORED_PREFIXES = ("loss.",)


@dataclass
class LoadedWeights:
    """Validated weights in our layout, kept on the CPU so a released codec can rebuild."""

    name: str                                  # "sd-vae" | "sdxl-vae" | "taesd" | "taesdxl"
    layout: str                                # how the file was laid out, for logs and reasons
    sources: tuple[Path, ...]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    factory: Callable[[], nn.Module] = field(repr=False)

    def build(self) -> nn.Module:
        """A fresh module holding these weights (no random init: built on the meta device)."""
        with torch.device("meta"):
            module = self.factory()
        module.load_state_dict(self.state_dict, strict=True, assign=True)
        return module.eval().requires_grad_(False)


# ---------------------------------------------------------------- reading

def read_state_dict(path: str | Path,
                    select: Callable[[list[str]], list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, flat, on the CPU.

    `select` picks, from all key names, the ones to keep: a 2-7 GB checkpoint holds a
    160 MB VAE, and from a .safetensors only the selected tensors are ever read.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CodecError(f"{path}: cannot read the weight file ({e.strerror or e})") from e
    if not head:
        raise CodecError(f"{path}: the file is empty")
    # The content decides, not the suffix: zip (torch >= 1.6) or a pickle protocol byte.
    zipped = head.startswith(b"PK\x03\x04")
    if zipped or head[0] == 0x80 or (path.suffix.lower() in TORCH_SUFFIXES and not _looks_like_safetensors(head)):
        tensors = _torch_load(path, select, zipped)
    else:
        tensors = _safetensors_load(path, select)
    if not tensors:
        raise CodecError(f"{path}: holds no tensors")
    return tensors


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _torch_load(path: Path, select: Callable[[list[str]], list[str]] | None,
                zipped: bool) -> dict[str, torch.Tensor]:
    try:
        # mmap (zip format only): a 4 GB .ckpt is not read whole to keep its 160 MB VAE.
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({found[1]})" if found else ""
            raise CodecError(
                f"{path}: refused: it holds Python objects besides tensors{what}, which could run "
                "code when loaded (torch.load weights_only=True); convert it to .safetensors"
            ) from e
        raise CodecError(f"{path}: not a torch weight file ({_first_line(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CodecError(f"{path}: truncated or not a torch weight file ({_first_line(e)})") from e
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # Lightning-style checkpoints wrap the weights
    if not isinstance(raw, dict):
        raise CodecError(f"{path}: holds a {type(raw).__name__}, not a dict of weights")
    # Counters such as "global_step" sit beside the weights; only tensors are weights.
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    keep = select(list(tensors)) if select else list(tensors)
    if not zipped:
        return {k: tensors[k] for k in keep}
    # Copies, so nothing we keep maps a file that may be replaced while the daemon runs
    # (and a file cut short inside a mapped tensor fails here, not later).
    try:
        return {k: tensors[k].clone() for k in keep}
    except (RuntimeError, OSError) as e:
        raise CodecError(f"{path}: truncated torch weight file ({_first_line(e)})") from e


def _safetensors_load(path: Path, select: Callable[[list[str]], list[str]] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            return {k: f.get_tensor(k) for k in (select(names) if select else names)}
    except Exception as e:  # safetensors raises its own SafetensorError, plus OSError
        raise CodecError(f"{path}: truncated or not a safetensors file ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    """The first sentence of a library's message: enough to say what broke."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.split(". ")[0][:200]


# ---------------------------------------------------------------- layouts

def load_weights(path: str | Path, variant: str = "auto") -> LoadedWeights:
    """Any supported file: a full checkpoint, an SD VAE, or one half (or both) of TAESD.

    variant "auto" | "sd" | "xl": which latent space (SD 1.x/2.x or SDXL); "auto" reads it
    off a full checkpoint's keys, else off "xl" in the file name.
    """
    path = Path(path)
    seen: dict[str, bool] = {}

    def select(names: list[str]) -> list[str]:
        vae = [k for k in names if k.startswith("first_stage_model.")]
        seen["checkpoint"] = bool(vae)
        seen["xl"] = any(k.startswith("conditioner.embedders.") for k in names)  # SDXL's text encoders
        return vae or names

    sd = read_state_dict(path, select)
    if seen["checkpoint"]:
        vae = {k[len("first_stage_model."):]: v for k, v in sd.items()}
        return _sd_vae(path, vae, "checkpoint first_stage_model", _is_xl(path, variant, seen["xl"]))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        return _sd_vae(path, diffusers_vae_to_ldm(sd), "diffusers VAE", _is_xl(path, variant))
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return _sd_vae(path, sd, "ldm VAE", _is_xl(path, variant))
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        return _taesd(path, diffusers_tiny_to_combined(sd), "diffusers AutoencoderTiny", (path,), variant)
    if any(k.startswith(("taesd_encoder.", "taesd_decoder.")) for k in sd):
        return _taesd(path, sd, "taesd combined", (path,), variant)
    half = taesd_half(sd)
    if half is not None:
        return _taesd_pair(path, sd, half, variant)
    sample = ", ".join(sorted(sd)[:4])
    raise CodecError(f"{path}: not a VAE or TAESD weight file I know (keys like {sample})")


def _is_xl(path: Path, variant: str, from_keys: bool = False) -> bool:
    if variant not in ("auto", "sd", "xl"):
        raise CodecError(f"{path}: unknown VAE variant {variant!r} (auto, sd or xl)")
    if variant != "auto":
        return variant == "xl"
    return from_keys or "xl" in path.name.lower()


def _sd_vae(path: Path, sd: dict[str, torch.Tensor], layout: str, xl: bool) -> LoadedWeights:
    leftovers = {k for k in sd if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES)}
    if leftovers:
        log.info("%s: ignoring %d training leftover(s) such as %s", path, len(leftovers), min(leftovers))
        sd = {k: v for k, v in sd.items() if k not in leftovers}
    try:
        cfg = kl.config_from_state_dict(sd)
    except KeyError as e:
        raise CodecError(f"{path}: missing key {e.args[0]!r} ({layout} layout)") from e
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise CodecError(f"{path}: weights of an unexpected shape for an SD VAE ({layout} layout)") from e
    bad = [c for c in (cfg.ch * m for m in cfg.ch_mult) if c <= 0 or c % kl.GROUPS]
    if bad or not cfg.ch_mult:
        raise CodecError(f"{path}: channel counts {bad or '[]'} do not fit the VAE's {kl.GROUPS} norm groups")
    scaling = kl.SDXL_SCALING if xl else kl.SD_SCALING
    factory = lambda: kl.AutoencoderKL(cfg, scaling)  # noqa: E731
    _check(path, sd, factory, layout)
    return LoadedWeights("sdxl-vae" if xl else "sd-vae", layout, (path,), sd, factory)


def _taesd(path: Path, sd: dict[str, torch.Tensor], layout: str, sources: tuple[Path, ...],
           variant: str) -> LoadedWeights:
    # ComfyUI keeps the latent scale it applies itself next to the halves; ours are scaled already.
    sd = {k: v for k, v in sd.items() if k not in ("vae_scale", "vae_shift")}
    try:
        width, latent_channels = taesd.shape_from_state_dict(sd)
    except KeyError as e:
        raise CodecError(f"{path}: missing key {e.args[0]!r} ({layout} layout)") from e
    except IndexError as e:
        raise CodecError(f"{path}: weights of an unexpected shape for TAESD ({layout} layout)") from e
    factory = lambda: taesd.TinyAutoencoder(width, latent_channels)  # noqa: E731
    _check(path, sd, factory, layout)
    xl = _is_xl(path, variant) or any("taesdxl" in p.name.lower() for p in sources)
    return LoadedWeights("taesdxl" if xl else "taesd", layout, sources, sd, factory)


def taesd_half(sd: dict[str, torch.Tensor]) -> str | None:
    """"encoder" or "decoder" for a bare TAESD half (nn.Sequential indices), else None."""
    first = sd.get("0.weight")
    if first is not None and first.ndim == 4 and first.shape[1] == 3 and "1.conv.0.weight" in sd:
        return "encoder"
    # The decoder's index 0 is the parameterless Clamp, so its first weights are "1.*".
    first = sd.get("1.weight")
    if first is not None and first.ndim == 4 and "3.conv.0.weight" in sd and "0.weight" not in sd:
        return "decoder"
    return None


def _taesd_pair(path: Path, sd: dict[str, torch.Tensor], half: str, variant: str) -> LoadedWeights:
    other_half = "decoder" if half == "encoder" else "encoder"
    other = sibling(path, half, other_half)
    if other is None:
        raise CodecError(f"{path}: this is the TAESD {half}; its {other_half} "
                         f"({path.name.replace(half, other_half)}) is not beside it")
    other_sd = read_state_dict(other)
    if taesd_half(other_sd) != other_half:
        raise CodecError(f"{other}: expected the TAESD {other_half} here, found other weights")
    enc_path, dec_path = (path, other) if half == "encoder" else (other, path)
    enc_sd, dec_sd = (sd, other_sd) if half == "encoder" else (other_sd, sd)
    # Each half is checked on its own, so an error names the file that has the problem.
    width, latent_channels = enc_sd["0.weight"].shape[0], dec_sd["1.weight"].shape[1]
    _check(enc_path, enc_sd, lambda: taesd.make_encoder(width, latent_channels), "taesd encoder")
    _check(dec_path, dec_sd, lambda: taesd.make_decoder(width, latent_channels), "taesd decoder")
    combined = {f"taesd_encoder.{k}": v for k, v in enc_sd.items()}
    combined.update({f"taesd_decoder.{k}": v for k, v in dec_sd.items()})
    return _taesd(path, combined, "taesd pair", (enc_path, dec_path), variant)


def sibling(path: Path, half: str, other_half: str) -> Path | None:
    """`taesd_decoder.pth` beside `taesd_encoder.pth` (any supported suffix)."""
    stem = path.stem
    if half not in stem:
        return None
    other_stem = other_half.join(stem.rsplit(half, 1))
    for suffix in (path.suffix, ".safetensors", ".pth", ".pt", ".ckpt"):
        candidate = path.with_name(other_stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _check(path: Path, sd: dict[str, torch.Tensor], factory: Callable[[], nn.Module], layout: str) -> None:
    """Every key present, none extra, every shape right: before anything is built."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in factory().state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    # Converted layouts are checked after conversion: say whose names the message uses.
    where = f"{layout} layout" + _RENAMED.get(layout, "")
    if missing:
        raise CodecError(f"{path}: missing key{_more(missing)} ({where})")
    if unexpected:
        raise CodecError(f"{path}: unexpected key{_more(unexpected)} ({where})")
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CodecError(f"{path}: wrong shape for {k!r}: {tuple(sd[k].shape)}, "
                             f"expected {tuple(shape)} ({where})")
        if not sd[k].is_floating_point():
            raise CodecError(f"{path}: {k!r} holds {sd[k].dtype}, not floating-point weights")


_RENAMED = {"diffusers VAE": "; keys named as in the ldm layout",
            "diffusers AutoencoderTiny": "; keys named as in taesd_encoder/decoder files, under taesd_*."}


def _more(keys: list[str]) -> str:
    extra = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f" {keys[0]!r}{extra}"


# ---------------------------------------------------------------- key conversion

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RESNET = {"conv_shortcut": "nin_shortcut"}


def diffusers_vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ldm keys; linear attention weights become 1x1 convs."""
    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            new = f"{m[1]}.mid.attn_1.{_ATTN.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)$", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_RESNET.get(m[3], m[3])}.{m[4]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[new] = value
    return out


def diffusers_tiny_to_combined(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderTiny keys -> ours; its decoder keeps the Clamp outside `layers`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", key):
            out[f"taesd_encoder.{m[1]}.{m[2]}"] = value
        elif m := re.match(r"decoder\.layers\.(\d+)\.(.+)$", key):
            out[f"taesd_decoder.{int(m[1]) + 1}.{m[2]}"] = value
        else:
            out[key] = value
    return out
