"""Getting a model for the in-process diffusion backend: `dreamd models pull` fetches one
from the Hugging Face hub into its standard cache, `dreamd models list` shows what is
usable offline. Light at import and in `list`: no torch, numpy or diffusers anywhere here.
"""
