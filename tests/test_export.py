"""`dreamd export` on the prepared ledger (tests/tui_ledger.py): MP4 (H.264, read back
with PyAV), animated WebP and GIF (read back with Pillow) hold the right frames in
playback order at the asked fps and size; frames retention deleted are made again from
their keyframes with the same codec, identical to the originals; a span whose
keyframe images are gone is named; the contact sheet; wrong requests refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamd.cli import main
from tests.test_cli_finish import data_dir, run  # noqa: F401 (a fixture: the prepared ledger)
from tests.tui_ledger import KEYFRAMES, N, picture


def frames_of(path) -> list[Image.Image]:
    if path.suffix == ".mp4":
        import av

        with av.open(str(path)) as c:
            return [f.to_image() for f in c.decode(video=0)]
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(im.convert("RGB"))
        return out


def close_to(a: Image.Image, b: Image.Image, tol: float) -> bool:
    return float(np.abs(np.asarray(a, float) - np.asarray(b.resize(a.size), float)).mean()) < tol


def expected(chains) -> list[Image.Image]:
    """The prepared frames in playback order: keyframe k at t = 0, 1/3, 2/3."""
    out = []
    for k in chains:
        ts = [0.0] if k == KEYFRAMES - 1 else [i / (N + 1) for i in range(N + 1)]
        out.extend(picture(k + t) for t in ts)
    return out


def test_mp4_of_the_last_seconds_ends_at_the_playhead(data_dir, tmp_path, capsys):
    out = tmp_path / "dream.mp4"
    code, said, _ = run(capsys, "export", "--seconds", "1.5", "--output", str(out))
    assert code == 0, said
    import av

    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.width, s.height) == ("h264", 128, 64)
        assert float(s.average_rate) == 4.0
    got = frames_of(out)
    # 1.5 s at the display's 4 fps: the 6 frames up to the playhead (keyframe 2, t = 1/3)
    want = expected([0, 1, 2])[2:8]
    assert len(got) == 6
    assert all(close_to(g, w, 12) for g, w in zip(got, want))
    assert said.startswith(f"{out}: 6 frames at 4 fps (1.5 s), 128x64, keyframes 0 to 2")


@pytest.mark.parametrize("ext", [".webp", ".gif"])
def test_animations_by_chain_range_at_a_chosen_fps_and_size(data_dir, tmp_path, capsys, ext):
    out = tmp_path / f"dream{ext}"
    code, said, _ = run(capsys, "export", "--from", "1", "--to", "3", "--fps", "10",
                        "--size", "64x32", "-o", str(out))
    assert code == 0
    got = frames_of(out)
    want = expected([1, 2]) + [picture(3)]           # the range ends at keyframe 3 itself
    assert len(got) == len(want) == 7 and got[0].size == (64, 32)
    assert all(close_to(g, w, 25 if ext == ".gif" else 12) for g, w in zip(got, want))
    with Image.open(out) as im:
        im.load()
        assert im.info["duration"] == 100 and im.info.get("loop") == 0


def test_deleted_frames_are_made_again_and_lost_spans_named(data_dir, tmp_path, capsys):
    for f in (data_dir / "frames").glob("f00003_*"):       # retention took these…
        f.unlink()
    (data_dir / "frames" / "f00000_0.3333.png").unlink()   # …and one of keyframe 0's
    out = tmp_path / "dream.webp"
    code, said, err = run(capsys, "export", "--last", "6", "-o", str(out), "--quality", "100")
    assert code == 0
    # keyframe 0's image was pruned: its in-between is gone for good, and said
    assert "keyframes 0 to 1 (from 2026-11-30 12:00:02.000000): frames deleted and not " \
           "made again: keyframe image 0 deleted by retention" in err
    assert "3 frames made again from their keyframes; 1 gaps" in said
    got = frames_of(out)
    assert len(got) == 15
    # segment 3 made again with the pixel codec: the same slerp of the same keyframes
    # the interpolation worker did (here the keyframe pictures themselves at t = 0)
    segment3 = got[8:11]          # after keyframe 0's 2 frames left, 1's and 2's 3
    assert close_to(segment3[0], picture(3), 3)
    from dreamd.latent.pixel import PixelCodec
    from dreamd.latent.images import to_images, to_tensor
    from dreamd.latent.slerp import slerp
    import torch

    c = PixelCodec()
    a = c.encode(to_tensor(Image.open(data_dir / "keyframes/k00003.png").convert("RGB")))[0]
    b = c.encode(to_tensor(Image.open(data_dir / "keyframes/k00004.png").convert("RGB")))[0]
    made = to_images(c.decode(slerp(a, b, torch.tensor([0, 1 / 3, 2 / 3]))))
    assert all(close_to(g, m, 3) for g, m in zip(segment3, made))


def test_nothing_left_is_an_error(data_dir, tmp_path, capsys):
    for f in (data_dir / "frames").glob("f00000_*"):
        f.unlink()
    code, _, err = run(capsys, "export", "--from", "0", "--to", "0", "-o",
                       str(tmp_path / "x.gif"))
    assert code == 1 and "every frame of that stretch is gone" in err
    assert not (tmp_path / "x.gif").exists()


def test_contact_sheet(data_dir, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    code, said, _ = run(capsys, "export", "--contact-sheet", str(out), "--columns", "3")
    assert code == 0 and said.startswith(f"{out}: 6 keyframes")
    with Image.open(out) as im:
        assert im.size[0] > 3 * 256 and im.size[1] > 2 * 128
        tile = im.convert("RGB").crop((6, 6, 6 + 256, 6 + 128))
    assert close_to(tile, picture(0), 20)               # keyframe 0 from its thumbnail


@pytest.mark.parametrize("argv,message", [
    (["--output", "x.avi"], "the format comes from the extension"),
    (["--last", "2", "--from", "1", "-o", "x.gif"], "not allowed with argument"),
    (["--size", "12x4", "-o", "x.gif"], "expected WIDTHxHEIGHT"),
    (["--seconds", "-3", "-o", "x.gif"], "expected a number > 0"),
    ([], "say where: --output FILE"),
    (["--from", "40", "-o", "x.gif"], "no completed keyframe in the range"),
    (["--last", "2", "--to", "4", "-o", "x.gif"], "--to goes with --from"),
])
def test_wrong_requests_are_refused(data_dir, capsys, argv, message):
    try:
        code = main(["export", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_keyframes_without_frames_yet_end_the_export_and_are_named(data_dir, tmp_path, capsys):
    import shutil
    import sqlite3

    # keyframe 6 completes, its pair not interpolated yet: it has no frame at all
    shutil.copy(data_dir / "keyframes/k00005.png", data_dir / "keyframes/k00006.png")
    conn = sqlite3.connect(data_dir / "dreamd.db")
    conn.execute("UPDATE keyframes SET state = 'completed', path = 'keyframes/k00006.png' "
                 "WHERE chain_index = 6")
    conn.commit()
    conn.close()
    out = tmp_path / "dream.webp"
    code, said, err = run(capsys, "export", "--last", "3", "-o", str(out))
    assert code == 0
    assert "keyframes 6 to 6 have no frames yet (still being interpolated): the export ends " \
           "at keyframe 5" in err
    assert said.startswith(f"{out}: 4 frames at 4 fps (1.0 s), 128x64, keyframes 4 to 5")
    code, _, err = run(capsys, "export", "--from", "6", "-o", str(out))
    assert code == 2 and "have no frames yet" in err
