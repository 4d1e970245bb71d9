"""Tokenizer round trips, captioned digits, caption folders and their errors."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from visionmoe.data import DatasetError
from visionmoe.data.captions import (
    DIGIT_CAPTION_TEMPLATES,
    digit_class_prompts,
    load_caption_folder,
    load_digit_captions,
)
from visionmoe.data.text import BOS_ID, EOS_ID, PAD_ID, Tokenizer

TOKENIZER = Tokenizer()


@given(st.text(max_size=40))
def test_round_trip_any_text(text):
    assert TOKENIZER.decode(TOKENIZER.encode(text, bos=True, eos=True)) == text


def test_known_words_are_single_tokens():
    ids = TOKENIZER.encode("a photo of the number seven")
    assert len(ids) == 6  # "a", " photo", " of", " the", " number", " seven"
    assert len(TOKENIZER.encode("7")) == 1 and len(TOKENIZER.encode("xyz")) == 3  # bytes
    assert max(ids) < TOKENIZER.vocab_size <= 512  # fits TextConfig's default vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOKENIZER.decode([TOKENIZER.vocab_size])


def test_encode_batch_pads_and_truncates():
    batch = TOKENIZER.encode_batch(["the digit 7", "seven", "a b c d e f g h i j"], max_len=6)
    assert batch.shape == (3, 6) and batch.dtype == torch.long
    assert batch[0].tolist()[:5] == [BOS_ID, *TOKENIZER.encode("the digit 7"), EOS_ID]
    assert batch[0, 5] == PAD_ID
    assert batch[1].tolist() == [BOS_ID, *TOKENIZER.encode("seven"), EOS_ID, 0, 0, 0]
    assert batch[2, -1] == EOS_ID  # truncated, but still ends with EOS
    assert TOKENIZER.decode(batch[1]) == "seven"


def test_digit_captions_are_seeded_and_name_the_class():
    a, b, c = load_digit_captions(0), load_digit_captions(0), load_digit_captions(1)
    assert a.train.captions == b.train.captions and a.train.captions != c.train.captions
    assert np.array_equal(a.test.images, c.test.images)  # the split does not depend on the seed
    assert a.train.images.shape[1:] == (8, 8, 1) and len(a.test) == 450
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for caption, label in zip(a.train.captions[:50], a.train.labels[:50], strict=True):
        assert len(caption) == 1
        assert str(label) in caption[0] or words[label] in caption[0]
    phrasings = {cap[0].replace("7", "#").replace("seven", "#") for cap in a.train.captions}
    assert len(phrasings) > 5
    prompts = digit_class_prompts()
    assert len(prompts) == 10 and all(len(p) == len(DIGIT_CAPTION_TEMPLATES) for p in prompts)
    assert "an 8" in prompts[8] and "a 7" in prompts[7]


def _images(root, names):
    for i, name in enumerate(names):
        Image.fromarray(np.full((6, 6), i * 40, dtype=np.uint8)).save(root / name)


def test_caption_folder_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    _images(tsv, ["a.png", "b.png", "c.png", "d.png"])
    lines = ["a.png\ta cat", "a.png\ta small cat", "b.png\ta dog", "c.png\tx", "d.png\ty"]
    (tsv / "captions.tsv").write_text("\n".join(lines) + "\n")
    splits = load_caption_folder(tsv, test_fraction=0.25)
    assert len(splits.train) == 3 and len(splits.test) == 1
    everything = splits.train.captions + splits.test.captions
    assert ["a cat", "a small cat"] in everything
    assert splits.train.images.shape[1:] == (6, 6, 1) and splits.train.labels is None

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    _images(jsonl, ["a.png", "b.png"])
    rows = [{"file": "a.png", "captions": ["one", "two"]}, {"file": "b.png", "caption": "three"}]
    (jsonl / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_caption_folder(jsonl, test_fraction=0.5)
    assert sorted(map(tuple, splits.train.captions + splits.test.captions)) == [
        ("one", "two"),
        ("three",),
    ]


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "no captions.tsv or captions.jsonl"),
        ({"captions.tsv": "a.png no tab here\n"}, "line 1 is not"),
        ({"captions.tsv": "a.png\tok\nmissing.png\tgone\n"}, "'missing.png' is missing"),
        ({"captions.jsonl": "{not json\n"}, "not JSON"),
        ({"captions.jsonl": '{"file": "a.png"}\n{"file": "b.png", "caption": "x"}\n'}, "lacks"),
        ({"captions.tsv": "a.png\tx\n", "captions.jsonl": ""}, "both"),
        ({"captions.tsv": "a.png\tonly one\n"}, "at least 2 images"),
    ],
)
def test_malformed_caption_folder(tmp_path, files, fragment):
    _images(tmp_path, ["a.png", "b.png"])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=fragment) as err:
        load_caption_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "captions.tsv" in str(err.value)


def test_missing_caption_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_caption_folder(tmp_path / "nowhere")
