"""The aesthetic memory: frame embeddings, the cache of diverse past frames, collapse
detection and injections (what keeps an img2img chain from converging on one look).

Nothing here is imported by the light CLI commands except `stats`, which needs
neither numpy nor torch.
"""
