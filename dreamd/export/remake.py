"""Frames retention deleted, made again: the segment's two keyframes encoded by the codec
that made it (the batch's `codec` and `divisor`), slerped and decoded as the
interpolation worker does. Nothing is written to the data dir (no stored latents):
the export holds the images in memory while it writes them.
"""

from __future__ import annotations

from dreamd.errors import CodecError
from dreamd.export.plan import Segment

KINDS_BY_NAME = {"pixel": "pixel", "taesd": "taesd", "taesdxl": "taesd", "sd-vae": "sd-vae",
                 "sdxl-vae": "sd-vae"}


class Remaker:
    """Codecs built once per (name, divisor) for the whole export."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._codecs: dict[tuple[str, float], object] = {}

    def codec(self, name: str, divisor: float):
        key = (name, float(divisor))
        if key not in self._codecs:
            from dreamd.latent.choose import choose_codec

            g = self.cfg.generation
            kind = KINDS_BY_NAME.get(name.split(":")[0].split("@")[0], "auto")
            codec, _why = choose_codec(
                kind, path=g.codec_path or None, models_dir=self.cfg.comfyui.models_dir or None,
                checkpoint=self.cfg.comfyui.checkpoint, divisor=divisor,
                device=None if g.codec_device == "auto" else g.codec_device,
                gpu_index=self.cfg.system.gpu, precision=g.codec_precision,
                variant=g.codec_variant)
            if codec.name != name:
                raise CodecError(f"made with the {name} codec, and this machine has "
                                 f"{codec.name} (its weights are not here)")
            self._codecs[key] = codec
        return self._codecs[key]

    def segment(self, seg: Segment) -> dict[float, object]:
        """{t: PIL image} for every position of the segment."""
        import torch
        from PIL import Image

        from dreamd.latent.images import to_images, to_tensor
        from dreamd.latent.slerp import slerp

        codec = self.codec(seg.codec, seg.divisor)
        size = (seg.start.width, seg.start.height)
        with Image.open(seg.start.path) as a, Image.open(seg.end.path) as b:
            ia, ib = a.convert("RGB"), b.convert("RGB")
        with torch.inference_mode():
            la = codec.encode(to_tensor(ia, codec.device, torch.float32))[0]
            lb = codec.encode(to_tensor(ib, codec.device, torch.float32))[0]
            ts = seg.positions
            images = to_images(codec.decode(slerp(la, lb, torch.tensor(ts, dtype=torch.float32))))
        return {round(t, 6): (im if im.size == size else im.resize(size, Image.Resampling.BICUBIC))
                for t, im in zip(ts, images)}
