"""A download-free tokenizer: a small fixed word vocabulary with a byte fallback.

Why not plain bytes: a caption such as "a photo of the number seven" is 27 bytes, too long for
LIMoE's 16-token texts, and a tiny model would first have to learn to spell. Why not a learned
BPE: it needs a vocabulary file (a download or a training step). Here the words that captions and
class prompts use are single tokens, and anything else is spelled out byte by byte, so every
string round-trips exactly.

Ids: 0 pad, 1 begin-of-text, 2 end-of-text, 3..258 the 256 bytes, then each word of ``WORDS``
twice (bare, then with a leading space, GPT-2 style, so spacing is encoded without extra tokens).
The id layout is part of every trained checkpoint: only ever *append* to ``WORDS``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "WORDS", "Tokenizer"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_BYTE_OFFSET = 3
WORDS: tuple[str, ...] = (
    # numbers, as words and numerals
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    *(str(i) for i in range(10)),
    # caption and prompt vocabulary
    "a",
    "an",
    "the",
    "of",
    "this",
    "is",
    "it",
    "photo",
    "image",
    "picture",
    "drawing",
    "sketch",
    "digit",
    "number",
    "numeral",
    "handwritten",
    "written",
    "hand",
    "by",
    "small",
    "low",
    "resolution",
    "blurry",
    "pixelated",
    "black",
    "white",
    "and",
    "in",
    "on",
    "with",
    "shows",
    "showing",
    "scan",
    "sample",
    "example",
    "class",
    "object",
)
# A run of letters or of decimal digits (with one optional leading space), or any single char.
_PIECES = re.compile(r" ?[A-Za-z]+| ?[0-9]+|.", re.DOTALL)


class Tokenizer:
    """Word-or-bytes tokenizer; ``encode`` / ``decode`` are exact inverses (without specials)."""

    def __init__(self, words: Sequence[str] = WORDS) -> None:
        if len(set(words)) != len(words):
            raise ValueError("tokenizer words must be unique")
        first = _BYTE_OFFSET + 256
        self._piece_to_id: dict[str, int] = {}
        for i, word in enumerate(words):
            if not _PIECES.fullmatch(word) or word.startswith(" "):
                raise ValueError(f"tokenizer word {word!r} is not one letter or digit run")
            self._piece_to_id[word] = first + 2 * i
            self._piece_to_id[" " + word] = first + 2 * i + 1
        self._id_to_piece = {i: p.encode("utf-8") for p, i in self._piece_to_id.items()}
        self.vocab_size = first + 2 * len(words)

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (known words as one id each, everything else as bytes)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        ids = [BOS_ID] if bos else []
        for piece in _PIECES.findall(text):
            known = self._piece_to_id.get(piece)
            if known is not None:
                ids.append(known)
            else:
                ids.extend(_BYTE_OFFSET + b for b in piece.encode("utf-8"))
        if eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; pad / BOS / EOS are skipped, invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in (PAD_ID, BOS_ID, EOS_ID):
                continue
            if _BYTE_OFFSET <= i < _BYTE_OFFSET + 256:
                out.append(i - _BYTE_OFFSET)
            elif i in self._id_to_piece:
                out.extend(self._id_to_piece[i])
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    def encode_batch(
        self, texts: Sequence[str], max_len: int, bos: bool = True, eos: bool = True
    ) -> torch.Tensor:
        """(B, max_len) int64 ids, right-padded with 0; texts that are too long are truncated.

        Truncation keeps the EOS token when asked for, so a model always sees where a text ends.
        """
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        out = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text, bos=bos, eos=False)[: max_len - (1 if eos else 0)]
            if eos:
                ids.append(EOS_ID)
            if not ids:
                raise ValueError(f"text {text!r} encodes to no tokens; enable bos or eos")
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
