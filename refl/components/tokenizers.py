"""Tokenizers built offline. CLIP's: real `CLIPTokenizer`s rebuilt from the BPE vocabulary that open_clip
ships, so they give the same ids as OpenAI CLIP (and open_clip) do. SDXL's second tokenizer pads with "!"
(id 0) instead of <|endoftext|>, and so does the SDXL presets' one. T5's (the flow presets): a small
character-level `T5TokenizerFast` with T5's special tokens and ids (<pad> 0, </s> 1, <unk> 2), for the
presets' random-weight T5 encoders; real T5 vocabularies come with real models.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from runkit.files import atomic_write_text

# OpenAI CLIP's vocabulary: 256 byte tokens, the same with "</w>", 48,894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2
# SDXL's second tokenizer pads with "!" (what its released tokenizer_2 does); the first pads with
# <|endoftext|>.
SDXL_PAD_TOKEN_2 = "!"


def _cache_dir() -> Path:
    root = os.environ.get("SOCIAL_REFL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "social-refl")
    return Path(root)


def clip_vocab_files(directory: str | os.PathLike | None = None) -> Path:
    """Write CLIP's `vocab.json` (49,408 tokens) and `merges.txt`, rebuilt from open_clip's BPE file.

    The order reproduces OpenAI CLIP's: byte symbols, byte symbols + "</w>", one token per merge,
    then <|startoftext|>, <|endoftext|>. Files are written atomically and reused when present.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = Path(directory) if directory is not None else _cache_dir() / "clip-tokenizer"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return directory
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    # Concurrent builders never see half files; vocab.json last, as the check above reads it first.
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(directory / "vocab.json",
                      json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    return directory


def build_clip_tokenizer(context_length: int = 77, directory: str | os.PathLike | None = None,
                         pad_token: str = "<|endoftext|>"):
    """A real `CLIPTokenizer` with OpenAI CLIP's vocabulary, built without network access (`pad_token`:
    SDXL's second tokenizer pads with "!").

    transformers 5's `CLIPTokenizer` takes the vocabulary as `vocab=` (dict) and `merges=` (list of pairs);
    the older `vocab_file=` / `merges_file=` keywords are silently ignored there and give garbage
    ids, so the contents are passed explicitly (tests compare the ids with open_clip's).
    """
    from transformers import CLIPTokenizer

    files = clip_vocab_files(directory)
    vocab = json.loads((files / "vocab.json").read_text())
    merges = (files / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(m.split()) for m in merges if m]  # the tokenizers backend wants (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length, pad_token=pad_token)


# The tiny T5 vocabulary: T5's three specials at T5's ids, the word-start marker, then every printable ASCII
# character alone and after the marker. Unigram scores prefer a marked character to marker + character.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_CHARS = [chr(c) for c in range(33, 127)]


def build_t5_tokenizer(model_max_length: int = 512):
    """A `T5TokenizerFast` built in code (a `tokenizers` Unigram model: no download, no sentencepiece file),
    with T5's conventions: "▁" marks a word start, </s> ends every sequence, <pad> is id 0. It saves and
    reloads through `T5TokenizerFast.from_pretrained` with the same ids (tests check)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [(t, 0.0) for t in T5_SPECIALS] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _T5_CHARS] + [("\u2581" + c, -2.5) for c in _T5_CHARS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
