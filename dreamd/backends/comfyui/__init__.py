"""The ComfyUI keyframe backend: keyframes made by a ComfyUI server over its HTTP API.

`client` speaks to one server, `events` follows its prompts over the websocket,
`workflow` loads and fills the API-format templates in workflows/, `servers` tracks the
health of several servers (benched, set aside), `backend` is the KeyframeBackend the
keyframe worker calls, `daemon_backend` wraps it for `dreamd run`, `supervisor` runs a
local ComfyUI process when told to, and `doctor` checks each server for `dreamd doctor`.
"""

from dreamd.backends.comfyui.backend import ComfyUIBackend
from dreamd.backends.comfyui.client import (ComfyUIClient, NotComfyUIError, PromptRejectedError,
                                            ServerUnreachableError, UnsafeOutputError)
from dreamd.backends.comfyui.servers import ServerHealth, ServerPool
from dreamd.backends.comfyui.supervisor import ComfyUISupervisor, SupervisorStatus
from dreamd.backends.comfyui.workflow import WorkflowError, load_workflow, resolve_mapping

__all__ = ["ComfyUIBackend", "ComfyUIClient", "ComfyUISupervisor", "NotComfyUIError",
           "PromptRejectedError",
           "ServerHealth", "ServerPool", "ServerUnreachableError", "SupervisorStatus",
           "UnsafeOutputError", "WorkflowError", "load_workflow", "resolve_mapping"]
