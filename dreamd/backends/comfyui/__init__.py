"""The ComfyUI keyframe backend: keyframes made by a ComfyUI server over its HTTP API.

`client` speaks to one server, `workflow` loads and fills the API-format templates in
workflows/, `servers` tracks the health of several servers, `backend` is the KeyframeBackend
the keyframe worker calls, and `supervisor` runs a local ComfyUI process when told to.
"""

from dreamd.backends.comfyui.backend import ComfyUIBackend
from dreamd.backends.comfyui.client import (ComfyUIClient, PromptRejectedError,
                                            ServerUnreachableError, UnsafeOutputError)
from dreamd.backends.comfyui.servers import ServerHealth, ServerPool
from dreamd.backends.comfyui.supervisor import ComfyUISupervisor, SupervisorStatus
from dreamd.backends.comfyui.workflow import WorkflowError, load_workflow, resolve_mapping

__all__ = ["ComfyUIBackend", "ComfyUIClient", "ComfyUISupervisor", "PromptRejectedError",
           "ServerHealth", "ServerPool", "ServerUnreachableError", "SupervisorStatus",
           "UnsafeOutputError", "WorkflowError", "load_workflow", "resolve_mapping"]
