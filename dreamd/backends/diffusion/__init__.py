"""The in-process keyframe backend: Stable Diffusion img2img on `diffusers`, in the daemon.

locate.py finds the model and says its family (no torch: `dreamd models list` uses it);
skeletons/ holds the configs a single-file checkpoint is built from offline; tokenizer.py
builds CLIP's tokenizer from open_clip's bundled BPE; device.py picks the device and dtype;
load.py builds the pipeline; backend.py is the KeyframeBackend (latent feedback, seeds, the
procedural fallback, free); doctor.py is `dreamd doctor`'s check. Nothing here is imported
by this file, so importing locate stays light.
"""
