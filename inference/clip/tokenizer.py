"""Chinese-CLIP's text tokenizer in pure Python (no torch, no cn_clip).

It reproduces `cn_clip.clip.tokenize` id for id: BERT's basic tokenizer (control characters dropped, whitespace
normalised, a space around every CJK ideograph, lower-casing, accents stripped, punctuation split off) followed by
greedy longest-match WordPiece over cn-clip's vocabulary, then `[CLS] pieces… [SEP]` truncated to the context length
and padded with `[PAD]` (id 0). The text encoder masks `[PAD]` positions, so a batch may also be padded only to its
longest sequence ("dynamic" padding), which is cheaper and gives the same embeddings.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

# cn-clip's trained models all use 52 positions ([CLS] + 50 pieces + [SEP]).
DEFAULT_CONTEXT_LENGTH = 52

# Code-point ranges BERT treats as Chinese ideographs (one token each). Hangul and kana are deliberately absent:
# those scripts are written with spaces, so BERT leaves them to the whitespace/WordPiece path.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)

# Character classes used by the basic tokenizer.
_DROP, _SPACE, _CJK, _PLAIN = 0, 1, 2, 3


@lru_cache(maxsize=65536)
def _char_class(ch: str) -> int:
    cp = ord(ch)
    if ch in " \t\n\r":
        return _SPACE  # tab/newline/CR are Cc but BERT treats them as whitespace, not as controls to drop
    cat = unicodedata.category(ch)
    if cp == 0 or cp == 0xFFFD or cat in ("Cc", "Cf"):
        return _DROP
    if cat == "Zs":
        return _SPACE
    for lo, hi in _CJK_RANGES:
        if lo <= cp <= hi:
            return _CJK
    return _PLAIN


@lru_cache(maxsize=65536)
def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    # Every non-alphanumeric printable ASCII character counts, even `^ $ \``, which Unicode files as symbols.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def load_vocab(path: Path | str) -> dict[str, int]:
    """Token → id, id being the line number. A repeated token keeps its last line, as BERT's loader does."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.strip()] = i
    return vocab


class ClipTokenizer:
    """Turns text into cn-clip token ids with the vocabulary that ships with the exported model."""

    def __init__(self, vocab_file: Path | str, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 lowercase: bool = True, max_word_chars: int = 200):
        if context_length < 2:
            raise ValueError("context_length must leave room for [CLS] and [SEP] (>= 2)")
        self.vocab = load_vocab(vocab_file)
        self.context_length = context_length
        self.lowercase = lowercase
        self.max_word_chars = max_word_chars
        try:
            self.pad_id = self.vocab["[PAD]"]
            self.cls_id = self.vocab["[CLS]"]
            self.sep_id = self.vocab["[SEP]"]
            self.unk_id = self.vocab["[UNK]"]
        except KeyError as e:
            raise ValueError(f"{vocab_file} is not a BERT vocabulary: no {e.args[0]} token") from None
        # Per-instance cache: the same words recur constantly in captions and queries.
        self._pieces = lru_cache(maxsize=100_000)(self._wordpiece)

    # -- basic tokenizer -------------------------------------------------------------------------------------

    def _words(self, text: str) -> list[str]:
        buf: list[str] = []
        for ch in text:
            kind = _char_class(ch)
            if kind == _DROP:
                continue
            if kind == _SPACE:
                buf.append(" ")
            elif kind == _CJK:
                buf.append(f" {ch} ")
            else:
                buf.append(ch)
        words: list[str] = []
        for word in "".join(buf).split():
            if self.lowercase:
                word = word.lower()
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            words.extend(self._split_punct(word))
        return words

    @staticmethod
    def _split_punct(word: str) -> list[str]:
        out: list[str] = []
        run: list[str] = []
        for ch in word:
            if _is_punct(ch):
                if run:
                    out.append("".join(run))
                    run = []
                out.append(ch)
            else:
                run.append(ch)
        if run:
            out.append("".join(run))
        # Lower-casing/NFD may in theory leave separators inside a piece; re-split so nothing carries whitespace.
        return [p for piece in out for p in piece.split()]

    # -- wordpiece ---------------------------------------------------------------------------------------------

    def _wordpiece(self, word: str) -> tuple[str, ...]:
        if len(word) > self.max_word_chars:
            return ("[UNK]",)
        pieces: list[str] = []
        start, n = 0, len(word)
        while start < n:
            end = n
            found = None
            while end > start:
                cand = word[start:end] if start == 0 else "##" + word[start:end]
                if cand in self.vocab:
                    found = cand
                    break
                end -= 1
            if found is None:
                return ("[UNK]",)  # one unknown stretch makes the whole word unknown, as in BERT
            pieces.append(found)
            start = end
        return tuple(pieces)

    # -- public ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """WordPiece strings for `text`, without [CLS]/[SEP]."""
        return [p for w in self._words(text) for p in self._pieces(w)]

    def encode(self, text: str, context_length: int | None = None) -> list[int]:
        """`[CLS] ids… [SEP]` truncated to `context_length` (default: the tokenizer's), unpadded."""
        length = context_length or self.context_length
        if length < 2:
            raise ValueError("context_length must be >= 2")
        ids = [self.vocab[p] for p in self.tokenize(text)][: length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None,
                 dynamic: bool = False) -> np.ndarray:
        """int64 ids, shape [N, L]. Fixed: L = context_length (cn-clip's `tokenize`). Dynamic: L = the longest
        sequence in the batch (never more than context_length), which the text encoder accepts as well."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        rows = [self.encode(t, length) for t in texts]
        width = max((len(r) for r in rows), default=2) if dynamic else length
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out


def tokenize(texts: str | Iterable[str], vocab_file: Path | str, context_length: int = DEFAULT_CONTEXT_LENGTH,
             dynamic: bool = False) -> np.ndarray:
    """One-shot convenience; keep a `ClipTokenizer` around when tokenizing repeatedly."""
    return ClipTokenizer(vocab_file, context_length)(texts, dynamic=dynamic)
