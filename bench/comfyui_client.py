"""Benchmark of the ComfyUI backend's own cost, against the test double on 127.0.0.1:

1. overhead per keyframe with zero generation delay: re-attach check, upload, POST /prompt,
   polling /history, GET /view, decode and checks; a chain where each keyframe's output is
   the next one's input (so every keyframe uploads a new image), at the default poll interval
   and at a 10 ms one (which shows the cost of the requests alone);
2. poll-to-notice latency: time from the double writing the history entry to the backend
   seeing it, at the default poll interval, over generation delays spread at random;
3. pushed against polled (`--push`): overhead per keyframe beyond the server's own
   execution time (execution_start to execution_success in its history entry), with the
   prompt followed over the websocket (push, the default) and by polling /history at the
   default interval; against the double run as a process of its own, or `--url` a real
   ComfyUI. The keyframe worker's PNG write and ledger commit are not counted
   (bench/pipeline.py measures those).

    .venv/bin/python bench/comfyui_client.py [--keyframes 100] [--latency-runs 40] [--write]
    .venv/bin/python bench/comfyui_client.py --push [--push-keyframes 60] [--url URL --checkpoint NAME] [--write]

`--write` replaces the "ComfyUI client" section of bench/RESULTS.md (with --push: the
"ComfyUI: pushed against polled" section).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dreamd.backends import KeyframeRequest  # noqa: E402
from dreamd.backends.comfyui import ComfyUIBackend  # noqa: E402
from tests.comfyui_double import ComfyUIDouble  # noqa: E402

CKPT = "random-sd15.safetensors"
SIZE = (512, 256)
DOUBLE_DELAY = (0.2, 0.6)   # seconds per prompt of the double, at random, with --push


def request(image: Image.Image | None, seed: int) -> KeyframeRequest:
    return KeyframeRequest(chain_index=seed, width=SIZE[0], height=SIZE[1], seed=seed, theme="ethereal",
                           prompt="a window", negative_prompt="blurry", denoise=0.3, image=image,
                           prompt_id=str(uuid.uuid4()))


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], "max": ordered[-1]}


def overhead(keyframes: int, poll_interval: float) -> tuple[dict[str, float], float]:
    with ComfyUIDouble(checkpoints=[CKPT]) as double, tempfile.TemporaryDirectory() as data:
        backend = ComfyUIBackend(double.url, checkpoint=CKPT, poll_interval=poll_interval, data_dir=data)
        backend.validate()
        image = Image.new("RGB", SIZE, (90, 60, 200))
        backend.generate(request(image, 0))  # warm: connections, object_info
        before = len(double.requests)
        times = []
        for k in range(1, keyframes + 1):
            t0 = time.perf_counter()
            image = backend.generate(request(image, k)).image
            times.append(time.perf_counter() - t0)
        per_keyframe = (len(double.requests) - before) / keyframes
        backend.close()
    return stats(times), per_keyframe


def notice_latency(runs: int, poll_interval: float) -> dict[str, float]:
    rng = random.Random(5)
    with ComfyUIDouble(checkpoints=[CKPT]) as double, tempfile.TemporaryDirectory() as data:
        backend = ComfyUIBackend(double.url, checkpoint=CKPT, poll_interval=poll_interval, data_dir=data)
        client = backend._servers[double.url.rstrip("/")].client
        seen: dict[str, float] = {}
        real_history = client.history

        def history(prompt_id: str):
            entry = real_history(prompt_id)
            if entry is not None:
                seen.setdefault(prompt_id, time.monotonic())
            return entry
        client.history = history  # type: ignore[method-assign]
        image = Image.new("RGB", SIZE, (90, 60, 200))
        latencies = []
        for k in range(runs):
            double.delay = rng.uniform(0.2, 0.7)
            req = request(image, k)
            backend.generate(req)
            latencies.append(seen[req.prompt_id] - double.finished_at[req.prompt_id])
        backend.close()
    return stats(latencies)


def _server(url: str | None, stack: contextlib.ExitStack) -> str:
    """`url`, or the double started as a process of its own (its HTTP threads then do not
    share this process's GIL, as a real ComfyUI would not)."""
    if url:
        return url.rstrip("/")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.comfyui_double", "--port", str(port),
                             "--delay", str(DOUBLE_DELAY[0]), "--delay-max", str(DOUBLE_DELAY[1]),
                             "--checkpoint", CKPT], cwd=REPO,
                            stdout=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait(timeout=30)))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/system_stats", timeout=1).ok:
                return url
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError("the double did not start")


def beyond_execution(keyframes: int, push: bool, poll_interval: float, url: str | None,
                     checkpoint: str) -> dict[str, float]:
    """Per keyframe: generate()'s wall time minus the server's own execution time, read
    from the history entry's execution_start and execution_success timestamps (what a
    real ComfyUI records too)."""
    with contextlib.ExitStack() as stack:
        url = _server(url, stack)
        backend = ComfyUIBackend(url, checkpoint=checkpoint, poll_interval=poll_interval,
                                 push=push)
        stack.callback(backend.close)
        backend.validate()
        image = Image.new("RGB", SIZE, (90, 60, 200))
        backend.generate(request(image, 0))  # warm: connections, socket, object_info
        overheads = []
        for k in range(1, keyframes + 1):
            # as the keyframe worker calls it: the server recorded before each POST, the
            # input handed over as the PNG file it wrote for the previous keyframe (level 3)
            buf = io.BytesIO()
            image.save(buf, "PNG", compress_level=3)
            req = dataclasses.replace(request(image, k), on_server=lambda url: None,
                                      image_png=buf.getvalue())
            t0 = time.monotonic()
            result = backend.generate(req)
            total = time.monotonic() - t0
            entry = requests.get(f"{url}/history/{req.prompt_id}", timeout=10).json()[req.prompt_id]
            stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]
                      if "timestamp" in data}
            executed = (stamps["execution_success"] - stamps["execution_start"]) / 1000
            overheads.append(total - executed)
            assert result.info["pushed"] is push, result.info
            image = result.image
    return stats(overheads)


def push_section(keyframes: int, url: str | None, checkpoint: str) -> str:
    default_poll = ComfyUIBackend.__init__.__kwdefaults__["poll_interval"]
    pushed = beyond_execution(keyframes, True, default_poll, url, checkpoint)
    polled = beyond_execution(keyframes, False, default_poll, url, checkpoint)
    against = (f"a ComfyUI at {url}" if url else
               f"`tests/comfyui_double.py` as a process of its own on 127.0.0.1, "
               f"{DOUBLE_DELAY[0]:g}-{DOUBLE_DELAY[1]:g} s per prompt at random (so the end falls "
               "anywhere between two polls) with a progress frame per step (no real ComfyUI is "
               "on this machine)")
    cmd = " ".join(["bench/comfyui_client.py"] + sys.argv[1:])
    return f"""## ComfyUI: pushed against polled

`.venv/bin/python {cmd}` on {time.strftime('%Y-%m-%d')}, 2-core CPU, no GPU (this dev box),
loaded by parallel work ({machine()}). Against {against}: {keyframes} {SIZE[0]}x{SIZE[1]}
img2img keyframes in a chain per mode. Overhead = generate()'s wall time minus the server's
own execution time (execution_start to execution_success in its history entry), called as
the keyframe worker calls it (the server recorded before the POST, so a fresh prompt needs
no re-attach look-up; the input handed over as the PNG file of the previous keyframe, so it
is not encoded again): upload, POST, the wait until the end is noticed,
/history, /view, decode and checks. The keyframe worker's own PNG write and ledger commit
come on top (bench/pipeline.py measures the daemon end to end).

| mode | overhead beyond execution per keyframe |
| --- | --- |
| pushed (websocket, `push = true`, the default) | median {pushed['p50'] * 1000:.1f} ms, p95 {pushed['p95'] * 1000:.1f} ms, mean {pushed['mean'] * 1000:.1f} ms |
| polled (`push = false`, poll interval {default_poll:g} s) | median {polled['p50'] * 1000:.1f} ms, p95 {polled['p95'] * 1000:.1f} ms, mean {polled['mean'] * 1000:.1f} ms |

Push takes the wait for the next poll (half the interval on average) out of every keyframe;
what is left is the requests and the image work. Profiled once by step (2026-12-02, load
average ~8): of the pushed overhead, the upload (28 ms) and the POST (10 ms) were mostly
the double's own multipart parsing and validation in Python (a real ComfyUI answered them
in 3 ms and 1-2 ms, ../shared/comfyui/timings.json), the input's PNG encode took 14 ms
(since spared: the worker hands over the file it wrote), /view and decode 19 ms, /history
6 ms. The issue's target (under 30 ms beyond
ComfyUI's execution, against a real server) is not measured here: there is no ComfyUI on
this machine (`--url http://HOST:8188 --checkpoint NAME` runs the same against one).
"""


def write_section(section: str, title: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n#", start + 1)     # the next heading of any level: others' notes
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, load average {load:.1f} at the end (shared machine)")


def ms(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in d.items())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keyframes", type=int, default=100)
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--push", action="store_true", help="pushed against polled only")
    parser.add_argument("--push-keyframes", type=int, default=60)
    parser.add_argument("--url", help="with --push: a real ComfyUI instead of the double")
    parser.add_argument("--checkpoint", default=CKPT, help="with --url: a checkpoint it has")
    args = parser.parse_args()
    if args.push:
        section = push_section(args.push_keyframes, args.url, args.checkpoint)
        print(section)
        if args.write:
            write_section(section, "## ComfyUI: pushed against polled")
        return 0
    default_poll = ComfyUIBackend.__init__.__kwdefaults__["poll_interval"]
    at_default, requests_default = overhead(args.keyframes, default_poll)
    at_fast, requests_fast = overhead(args.keyframes, 0.01)
    latency = notice_latency(args.latency_runs, default_poll)
    section = f"""## ComfyUI client

`{' '.join(['.venv/bin/python', 'bench/comfyui_client.py'] + sys.argv[1:])}` on {time.strftime('%Y-%m-%d')},
{machine()}. Against `tests/comfyui_double.py` on 127.0.0.1 with zero generation delay;
{SIZE[0]}x{SIZE[1]} keyframes in a chain (each output is the next input, so each keyframe
uploads a new PNG).

| measure | result |
| --- | --- |
| overhead per keyframe, poll interval {default_poll:g} s (default), {args.keyframes} keyframes | {ms(at_default)} ({requests_default:.1f} requests) |
| overhead per keyframe, poll interval 0.01 s, {args.keyframes} keyframes | {ms(at_fast)} ({requests_fast:.1f} requests) |
| poll-to-notice latency, poll interval {default_poll:g} s, {args.latency_runs} runs | {ms(latency)} |

With zero delay the double has usually not finished when the first /history poll arrives
(right after the POST), so the default interval's figure is mostly one poll wait; the 10 ms
row is the cost of the requests, PNG encode/decode and checks. Against a real ComfyUI on
CPU a 512x256 img2img keyframe takes ~63 s (../shared/comfyui/timings.json), so the client
adds well under 1%; the expected notice latency is half the poll interval.
"""
    print(section)
    if args.write:
        write_section(section, "## ComfyUI client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
