"""Caption tokenizers: a byte-level BPE trained here, or a pretrained CLIP tokenizer.

Both sit behind `Tokenizer`, which returns fixed-length int32 `input_ids` and
`attention_mask` arrays: <|startoftext|> caption <|endoftext|> padding, with
truncation that keeps <|endoftext|> as the last token.

  tok = train_bpe_tokenizer(captions, vocab_size=1024, save_dir=workdir)  # writes tokenizer.json
  tok = Tokenizer.from_dir(workdir)           # ours (tokenizer.json) or transformers' (tokenizer_config.json)
  batch = tok(["a red circle"])               # {"input_ids": (1, L), "attention_mask": (1, L)}
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, EOT, SOT = "<|pad|>", "<|endoftext|>", "<|startoftext|>"
SPECIAL_TOKENS = (PAD, EOT, SOT)  # ids 0, 1, 2 in a trained tokenizer
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_CONTEXT_LENGTH = 77


def _check_captions(captions, name: str = "captions", allow_empty: bool = False) -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError(f"{name}: expected a list of strings, got {type(captions).__name__}")
    if not captions:
        raise ValueError(f"{name}: expected at least one caption, got an empty list")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(caption).__name__}")
        if not allow_empty and not caption.strip():
            raise ValueError(f"{name}[{i}]: expected a non-empty caption, got {caption!r}")
    return list(captions)


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Tokenizer:
    """Fixed-length caption tokenizer over a `tokenizers.Tokenizer` backend.

    `hf_tokenizer` is set when the backend belongs to a transformers
    CLIPTokenizer (pretrained CLIP); `save` then writes transformers' files.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str,
        pad_token: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        hf_tokenizer=None,
    ):
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length: expected an int >= 2 (start and end tokens), got {context_length!r}")
        for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name}: {token!r} is not in the tokenizer's vocabulary")
        self.backend = backend
        self.hf_tokenizer = hf_tokenizer
        self.context_length = context_length
        self.eos_token, self.pad_token = eos_token, pad_token
        # The post-processor adds <|startoftext|>/<|endoftext|>; truncation leaves room for both.
        backend.enable_truncation(max_length=context_length)
        backend.enable_padding(length=context_length, pad_id=self.pad_token_id, pad_token=pad_token)

    @property
    def eos_token_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, captions: list[str], allow_empty: bool = False) -> dict[str, np.ndarray]:
        """captions -> {"input_ids": int32 (B, context_length), "attention_mask": int32 (B, context_length)}.

        allow_empty: accept "" (the unconditional caption of diffusers' UnCLIP pipelines)."""
        encodings = self.backend.encode_batch(_check_captions(captions, allow_empty=allow_empty))
        return {
            "input_ids": np.array([e.ids for e in encodings], np.int32),
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
        }

    def decode(self, input_ids) -> list[str]:
        """(B, L) ids -> captions (special tokens and padding dropped)."""
        texts = self.backend.decode_batch(np.asarray(input_ids).tolist(), skip_special_tokens=True)
        if self.hf_tokenizer is not None:  # CLIP's BPE marks word ends with "</w>"
            texts = [t.replace("</w>", " ") for t in texts]
        return [" ".join(t.split()) for t in texts]

    @classmethod
    def from_dir(cls, path, context_length: int | None = None) -> "Tokenizer":
        """Load ours (tokenizer.json alone) or a transformers CLIP tokenizer (tokenizer_config.json/vocab.json)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: expected a tokenizer directory, {path!r} is not a directory")
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer_config.json", "vocab.json")):
            from transformers import CLIPTokenizerFast

            hf_tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
            if context_length is None:
                max_length = hf_tokenizer.model_max_length
                context_length = max_length if max_length < 100_000 else DEFAULT_CONTEXT_LENGTH
            hf_tokenizer.model_max_length = context_length
            # A private copy: calling hf_tokenizer directly resets its backend's padding/truncation.
            backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
            return cls(
                backend,
                eos_token=str(hf_tokenizer.eos_token),
                pad_token=str(hf_tokenizer.pad_token),
                context_length=context_length,
                hf_tokenizer=hf_tokenizer,
            )
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"path: {path!r} has neither {TOKENIZER_FILE} nor a transformers tokenizer (tokenizer_config.json)"
            )
        backend = tokenizers.Tokenizer.from_file(file)
        if context_length is None:
            context_length = (backend.truncation or {}).get("max_length", DEFAULT_CONTEXT_LENGTH)
        return cls(backend, eos_token=EOT, pad_token=PAD, context_length=context_length)

    def save(self, path) -> None:
        """Write the tokenizer into directory `path` (created if needed), file by file atomically."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        if self.hf_tokenizer is None:
            _write_atomic(os.path.join(path, TOKENIZER_FILE), self.backend.to_str(pretty=True))
            return
        staging = tempfile.mkdtemp(dir=path, prefix=".tmp-tokenizer-")
        try:
            self.hf_tokenizer.save_pretrained(staging)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(path, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _new_bpe_backend() -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Strip(),
         normalizers.Lowercase()]
    )
    # Whitespace words, then bytes (GPT-2 style): every string encodes, no unknown token.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    save_dir=None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a lowercase byte-level BPE on `captions`; save it to `save_dir`/tokenizer.json if given.

    `vocab_size` is an upper bound: it covers the 256 byte symbols and the 3
    special tokens (<|pad|>=0, <|endoftext|>=1, <|startoftext|>=2).
    """
    captions = _check_captions(list(captions) if not isinstance(captions, (str, Sequence)) else captions)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if not isinstance(vocab_size, int) or vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size: expected an int >= {len(alphabet) + len(SPECIAL_TOKENS)} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    backend = _new_bpe_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer=trainer, length=len(captions))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}",
        special_tokens=[(SOT, backend.token_to_id(SOT)), (EOT, backend.token_to_id(EOT))],
    )
    tokenizer = Tokenizer(backend, eos_token=EOT, pad_token=PAD, context_length=context_length)
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer
