"""The pixel codec and the image <-> tensor conversions the interpolation worker uses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from dreamd.latent.codec import LatentCodec
from dreamd.errors import CodecError, ConfigError
from dreamd.latent.images import resize_batch, to_images, to_tensor
from dreamd.latent.pixel import PixelCodec
from dreamd.latent.slerp import slerp
from dreamd.seeding import make_seed


@pytest.fixture(scope="module")
def keyframes() -> list[Image.Image]:
    return [make_seed(0), make_seed(1)]


def test_is_a_latent_codec():
    codec = PixelCodec()
    assert isinstance(codec, LatentCodec)
    assert codec.name == "pixel" and codec.device == torch.device("cpu") and codec.dtype == torch.float32
    codec.release()                                      # nothing held; still usable after
    assert codec.decode(codec.encode(torch.zeros(1, 3, 8, 8))).shape == (1, 3, 8, 8)


def test_round_trip_is_exact_at_divisor_1(keyframes):
    codec = PixelCodec()
    images = to_tensor(keyframes)
    latents = codec.encode(images)
    assert latents.shape == images.shape
    assert float(latents.min()) >= -1 and float(latents.max()) <= 1
    back = codec.decode(latents)
    assert float((back - images).abs().max()) <= 1 / 255
    assert [im.tobytes() for im in to_images(back)] == [im.tobytes() for im in keyframes]


def test_divisor_shrinks_the_latent_and_decode_restores_the_size(keyframes):
    codec = PixelCodec(divisor=4)
    images = to_tensor(keyframes)
    latents = codec.encode(images)
    assert latents.shape == (2, 3, 64, 128)
    back = codec.decode(latents)
    assert back.shape == images.shape
    # Lossy, but the picture survives: mean error small, large shapes in place.
    assert float((back - images).abs().mean()) < 0.05
    assert float(codec.decode(codec.encode(back)).sub(back).abs().mean()) < 0.05


def test_slerp_between_two_keyframes_blends_smoothly(keyframes):
    codec = PixelCodec()
    pair = codec.encode(to_tensor(keyframes))
    frames = codec.decode(slerp(pair[0], pair[1], torch.linspace(0, 1, 7)))
    assert frames.shape == (7, 3, 256, 512)
    first, last = to_tensor(keyframes)
    assert float((frames[0] - first).abs().max()) <= 1 / 255
    assert float((frames[-1] - last).abs().max()) <= 1 / 255
    dist = [float((f - first).abs().mean()) for f in frames]
    assert all(b > a for a, b in zip(dist, dist[1:]))       # every step moves toward b
    assert len({round(d, 4) for d in dist}) == 7


def test_decode_clamps_to_the_unit_range():
    out = PixelCodec().decode(torch.full((1, 3, 4, 4), 3.0))
    assert float(out.max()) == 1.0
    assert float(PixelCodec().decode(torch.full((1, 3, 4, 4), -3.0)).min()) == 0.0


def test_dtype_is_respected():
    codec = PixelCodec(dtype=torch.float64)
    latents = codec.encode(torch.rand(2, 3, 8, 8))
    assert latents.dtype == torch.float64 and codec.decode(latents).dtype == torch.float64


def test_bad_construction_and_shapes():
    with pytest.raises(CodecError):
        PixelCodec(divisor=0)
    with pytest.raises(CodecError):
        PixelCodec(dtype=torch.int32)
    with pytest.raises(ValueError):
        PixelCodec(divisor=8).encode(torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError):
        PixelCodec().encode(torch.rand(3, 8, 8))


def test_to_tensor_and_back(keyframes):
    t = to_tensor(keyframes[0], device="cpu", dtype=torch.float16)
    assert t.shape == (1, 3, 256, 512) and t.dtype == torch.float16
    grey = Image.new("L", (4, 2), 128)
    g = to_tensor(grey)
    assert torch.allclose(g, torch.full((1, 3, 2, 4), 128 / 255))
    (back,) = to_images(g[0])                               # (3, H, W) also accepted
    assert back.mode == "RGB" and back.getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError):
        to_tensor([keyframes[0], keyframes[0].resize((10, 10))])
    with pytest.raises(ValueError):
        to_tensor([])


def test_to_images_clamps_and_rounds():
    t = torch.tensor([-0.5, 0.5 / 255, 1.4 / 255, 2.0]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    (im,) = to_images(t)
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 0, 1, 255]


def test_resize_batch():
    t = torch.rand(2, 3, 64, 128)
    assert resize_batch(t, 64, 128) is t
    small = resize_batch(t, 16, 32)
    assert small.shape == (2, 3, 16, 32)
    # Antialiased shrink of noise averages it: the result is smoother than a point sample.
    assert float(small.std()) < float(t[:, :, ::4, ::4].std())
    assert resize_batch(t.half(), 32, 64).dtype == torch.float16


def test_configure_torch_threads_in_a_fresh_process():
    # A subprocess: torch thread settings are process-wide and must not leak into other tests.
    code = (
        "import torch\n"
        "from dreamd.torch_threads import configure_torch_threads\n"
        "n = configure_torch_threads(1)\n"
        "m = configure_torch_threads(None)\n"           # a second call must not raise
        "print(n, torch.get_num_interop_threads(), m, torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, interop, m, now = map(int, out.stdout.split())
    assert (n, interop) == (1, 1)
    assert m == now and m >= 1
    from dreamd.torch_threads import configure_torch_threads
    with pytest.raises(ConfigError):
        configure_torch_threads(-1)
