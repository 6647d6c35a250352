"""The pure-Python tokenizer must give exactly cn-clip's token ids, fixed-length and dynamic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.clip.tokenizer import ClipTokenizer, load_vocab, tokenize
from tests.clip_fixtures import mixed_texts

cn_clip = pytest.importorskip("cn_clip.clip")  # the reference; always installed in the dev environment

VOCAB = Path(cn_clip.__file__).parent / "vocab.txt"
TEXTS = mixed_texts(400)


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer(VOCAB)


def test_generated_texts_are_varied():
    # Guard the generator itself: the parity test is only as good as its inputs.
    joined = "".join(TEXTS)
    assert len(set(TEXTS)) > 390
    for probe in ["猫", "😀", "é", "\u3000", "\u200b", "\x00", "，", "ｆ", "𠀀", "\u2028"]:
        assert probe in joined
    lengths = [len(cn_clip._tokenizer.tokenize(t)) for t in TEXTS]
    assert max(lengths) > 100 and min(lengths) == 0


def test_wordpieces_match_cn_clip(tok):
    for text in TEXTS:
        assert tok.tokenize(text) == cn_clip._tokenizer.tokenize(text), repr(text)


@pytest.mark.parametrize("context_length", [52, 8, 77])
def test_fixed_ids_match_cn_clip(tok, context_length):
    ours = tok(TEXTS, context_length=context_length)
    ref = cn_clip.tokenize(TEXTS, context_length=context_length).numpy()
    assert ours.dtype == np.int64 and ours.shape == ref.shape == (len(TEXTS), context_length)
    bad = [TEXTS[i] for i in np.nonzero((ours != ref).any(axis=1))[0]]
    assert not bad, bad[:5]


def test_dynamic_padding_is_the_fixed_ids_cut_to_the_longest(tok):
    ref = cn_clip.tokenize(TEXTS[:50]).numpy()
    for batch in (TEXTS[:50], TEXTS[3:4], ["猫", "一只猫"], [""]):
        dyn = tok(batch, dynamic=True)
        fixed = tok(batch)
        width = max(int((row != 0).sum()) for row in fixed)
        assert dyn.shape == (len(batch), width)
        assert np.array_equal(dyn, fixed[:, :width]) and not fixed[:, width:].any()
    assert np.array_equal(tok(TEXTS[:50], dynamic=True), ref[:, : tok(TEXTS[:50], dynamic=True).shape[1]])
    assert tok(["中" * 300], dynamic=True).shape == (1, 52)  # capped at the context length


def test_known_ids(tok):
    vocab = load_vocab(VOCAB)
    assert tok.pad_id == 0 and tok.cls_id == vocab["[CLS]"] == 101 and tok.sep_id == vocab["[SEP]"] == 102
    assert tok.tokenize("Hello, 世界!") == ["hello", ",", "世", "界", "!"]
    assert tok.tokenize("Café\u3000NAÏVE") == ["cafe", "na", "##ive"]  # accents stripped, lower-cased
    assert tok.tokenize("a" * 201) == ["[UNK]"]
    assert tok.encode("") == [101, 102]
    assert tok.encode("一只猫") == [101, vocab["一"], vocab["只"], vocab["猫"], 102]
    assert tokenize("一只猫", VOCAB).shape == (1, 52)
    assert tok([]).shape == (0, 52)


def test_rejects_too_short_context():
    with pytest.raises(ValueError):
        ClipTokenizer(VOCAB, context_length=1)


def test_vocab_without_specials_is_refused(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a BERT vocabulary"):
        ClipTokenizer(bad)
