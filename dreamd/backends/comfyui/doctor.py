"""`dreamd doctor` on the ComfyUI backend: each server asked, in one line each, whether it
answers, is ComfyUI, and can run the workflows as configured (node types, checkpoint,
sampler, scheduler, against its /object_info). With `start_command`, a first server that
does not answer yet is what dreamd will start, not a problem.
"""

from __future__ import annotations

from typing import Any

from dreamd.backends.comfyui.backend import Template
from dreamd.backends.comfyui.client import (ComfyUIClient, NotComfyUIError,
                                            ServerUnreachableError)
from dreamd.backends.comfyui.workflow import WorkflowError, check_against, fill
from dreamd.errors import DreamdError


def check_servers(cfg: Any, timeout: float = 5.0) -> tuple[str, str]:
    """(verdict, detail) over every URL in [comfyui] urls."""
    c, g = cfg.comfyui, cfg.generation
    try:
        templates = [Template.load(c.workflow, c.mapping or None, ("image", "prompt", "seed")),
                     Template.load(c.txt2img_workflow, c.txt2img_mapping or None,
                                   ("prompt", "seed", "width", "height"))]
    except WorkflowError as exc:
        return "problem", f"comfyui: {exc}"
    values = {"checkpoint": c.checkpoint or None, "sampler": g.sampler, "scheduler": g.scheduler}
    supervised = c.urls[0].rstrip("/") if (c.start_command or c.start_argv) else None
    lines, usable, starts = [], 0, False
    for url in (u.rstrip("/") for u in c.urls):
        client = ComfyUIClient(url, client_id="dreamd-doctor", connect_timeout=min(3.0, timeout),
                               read_timeout=timeout, tries=1, retry_read_timeouts=False)
        try:
            version = client.system_stats().get("system", {}).get("comfyui_version", "?")
        except NotComfyUIError as exc:
            lines.append(f"{url}: {exc}")
            client.close()
            continue
        except ServerUnreachableError as exc:
            if url == supervised:
                starts = True
                lines.append(f"{url}: not running; dreamd will start ComfyUI with start_command")
            else:
                lines.append(f"{url} DOWN ({str(exc).split(': ', 1)[-1]})")
            client.close()
            continue
        try:
            info = client.object_info()
            for t in templates:
                check_against(fill(t.workflow, t.mapping, values), info, source=t.source,
                              server=url)
        except WorkflowError as exc:
            lines.append(f"{url} ComfyUI {version}, cannot run the workflow: "
                         f"{str(exc).split(': ', 1)[-1]}")
            continue
        except DreamdError as exc:
            lines.append(f"{url} ComfyUI {version}, /object_info failed: {exc}")
            continue
        finally:
            client.close()
        usable += 1
        lines.append(f"{url} ok (ComfyUI {version}; checkpoint {c.checkpoint}, sampler "
                     f"{g.sampler}, scheduler {g.scheduler} all there)")
    if usable or starts:
        verdict = "ok" if usable == len(c.urls) or starts and usable + 1 == len(c.urls) \
            else "warning"
    else:
        verdict = "warning" if c.fallback == "procedural" else "problem"
    tail = "" if usable or starts else f"; fallback = {c.fallback}"
    return verdict, "comfyui: " + "; ".join(lines) + tail
