"""Tokenizers: the BPE trained here and the pretrained CLIP path against transformers."""

import json
import os

import numpy as np
import pytest

from dalle2_jax.convert.hf_clip import load_hf_tokenizer
from dalle2_jax.tokenizer import EOT, PAD, SOT, Tokenizer, train_bpe_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in ("white", "black")]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CAPTIONS, vocab_size=320, save_dir=save_dir, context_length=12)
    return save_dir


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_dir(bpe_dir)


def test_bpe_layout_and_reload(bpe, bpe_dir):
    assert os.listdir(bpe_dir) == ["tokenizer.json"]
    assert (bpe.pad_token_id, bpe.eos_token_id, bpe.backend.token_to_id(SOT)) == (0, 1, 2)
    assert bpe.context_length == 12
    assert 259 < bpe.vocab_size <= 320
    batch = bpe(["a red circle", "A  Blue\tSTAR"])
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        np.testing.assert_array_equal(mask, np.arange(12) < n)
        assert ids[0] == 2 and ids[n - 1] == 1 and np.all(ids[n:] == 0)
        assert 1 not in ids[1 : n - 1] and 2 not in ids[1 : n - 1]
    # Lowercased and whitespace-normalised: the same ids as the clean caption.
    np.testing.assert_array_equal(batch["input_ids"][1], bpe(["a blue star"])["input_ids"][0])
    # Frequent words of the corpus are single tokens.
    assert int(bpe(["red"])["attention_mask"].sum()) == 3
    assert bpe.decode(batch["input_ids"]) == ["a red circle", "a blue star"]


def test_bpe_training_is_deterministic(bpe_dir, tmp_path):
    train_bpe_tokenizer(CAPTIONS, vocab_size=320, save_dir=tmp_path, context_length=12)
    assert (tmp_path / "tokenizer.json").read_text() == (bpe_dir / "tokenizer.json").read_text()


def test_long_caption_truncated_keeping_eot(bpe):
    long_caption = " ".join(["a red circle and a blue square"] * 20)
    batch = bpe([long_caption, "a red circle"])
    ids = batch["input_ids"][0]
    assert batch["attention_mask"][0].all()
    assert ids[0] == 2 and ids[-1] == 1
    # The kept tokens are the caption's first ones.
    np.testing.assert_array_equal(ids[1:4], batch["input_ids"][1][1:4])


def test_non_ascii_and_emoji_round_trip(bpe):
    captions = ["un café crème", "a 🐱 on a ❤️ star", "naïve größe ñandú", "日本語 の 円"]
    wide = Tokenizer(bpe.backend, eos_token=EOT, pad_token=PAD, context_length=64)
    batch = wide(captions)
    assert batch["attention_mask"].sum(1).max() < 64  # nothing truncated
    assert wide.decode(batch["input_ids"]) == captions


@pytest.mark.parametrize(
    "captions, message",
    [
        (["a red circle", ""], r"captions\[1\].*non-empty"),
        (["  \t\n"], r"captions\[0\].*non-empty"),
        (["a red circle", "ok", 3], r"captions\[2\].*string.*int"),
        (["ok", None], r"captions\[1\].*string.*NoneType"),
        ("a red circle", r"captions.*list of strings.*str"),
        ([], r"captions.*at least one"),
    ],
)
def test_bad_captions_raise(bpe, captions, message):
    with pytest.raises(ValueError, match=message):
        bpe(captions)


def test_bad_training_input_raises(tmp_path):
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        train_bpe_tokenizer(["a red circle", " "], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CAPTIONS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="path"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return dict(zip(printable + extra, [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]))


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """A CLIP-style vocab.json/merges.txt: all bytes (plain and word-final) plus merges for a few words."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in ["a", "red", "circle", "blue", "square", "photo", "of", "the"]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.append(symbols[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


PARITY_CAPTIONS = [
    "a red circle",
    "A photo of the BLUE square!!",
    "the red circle, of a blue square; a photo of a photo of a red circle and the blue square",
    "un café 🐱 naïve",
    "x",
]


@pytest.mark.parity_transformers
@pytest.mark.parametrize("context_length", [8, 16, 77])
def test_pretrained_tokenizer_matches_transformers(clip_tokenizer_dir, context_length):
    from transformers import CLIPTokenizerFast

    reference = CLIPTokenizerFast.from_pretrained(clip_tokenizer_dir, local_files_only=True)
    expected = reference(
        PARITY_CAPTIONS, padding="max_length", truncation=True, max_length=context_length, return_tensors="np"
    )
    tokenizer = load_hf_tokenizer(clip_tokenizer_dir, context_length=context_length)
    batch = tokenizer(PARITY_CAPTIONS)
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == reference.eos_token_id
    # Truncated rows (the long caption at 8 and 16) still end in <|endoftext|>.
    assert np.all(batch["input_ids"][:, -1][batch["attention_mask"][:, -1] == 1] == reference.eos_token_id)
    assert (batch["attention_mask"][2].sum() == context_length) == (context_length < 77)


def test_pretrained_tokenizer_defaults_save_and_reload(clip_tokenizer_dir, tmp_path):
    tokenizer = load_hf_tokenizer(clip_tokenizer_dir)
    assert tokenizer.context_length == 77  # transformers reports no model_max_length here
    decoded = tokenizer.decode(tokenizer(["A photo of the BLUE square!!"])["input_ids"])
    assert decoded == ["a photo of the blue square !!"]  # CLIP's BPE ends words before punctuation
    tokenizer.save(tmp_path)
    assert "tokenizer_config.json" in os.listdir(tmp_path)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.context_length == 77 and reloaded.hf_tokenizer is not None
    np.testing.assert_array_equal(reloaded(PARITY_CAPTIONS)["input_ids"], tokenizer(PARITY_CAPTIONS)["input_ids"])
