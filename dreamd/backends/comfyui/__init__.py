"""The ComfyUI keyframe backend."""
