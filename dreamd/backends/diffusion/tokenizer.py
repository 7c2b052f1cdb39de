"""CLIP's tokenizer without a download: built from the BPE table open_clip ships inside its
wheel (bpe_simple_vocab_16e6.txt.gz), the same 49,408-token vocabulary every Stable
Diffusion text encoder uses. A diffusers folder's own tokenizer/ wins when it has one.

Verified against open_clip's SimpleTokenizer in the research note §2.3: identical ids except
where open_clip's ftfy/HTML clean-up acts (`&amp;`, ligatures).
"""

from __future__ import annotations

import functools
import gzip

# SD 1.x pads with <|endoftext|>; SD 2.x and SDXL's second encoder pad with "!" (id 0)
# (huggingface/candle stable_diffusion/clip.rs; open_clip.tokenize pads with 0 too).
PAD = {"sd15": "<|endoftext|>", "sd21": "!", "sdxl": "<|endoftext|>", "sdxl-2": "!"}
CONTEXT = 77
# open_clip's own slice of the file: the merges after the header line, 49152 - 256 - 2 of them
MERGES = 49152 - 256 - 2


def bpe_file() -> str:
    from open_clip.tokenizer import default_bpe    # a path: no model, no download
    return default_bpe()


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) exactly as open_clip's SimpleTokenizer builds them, with the
    specials under the names Hugging Face's CLIP tokenizer uses (ids 49406, 49407)."""
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges   # type: ignore[return-value]


def clip_tokenizer(family: str = "sd15"):
    """A transformers CLIPTokenizer for `family` ("sdxl-2" = SDXL's second encoder)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary()
    # model_max_length must be given: the default is ~1e30 and the SD pipelines pad to it
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CONTEXT,
                         pad_token=PAD.get(family, "<|endoftext|>"))
