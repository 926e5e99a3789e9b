"""BLOOM's byte-level BPE tokenizer on top of the `tokenizers` library.

`BloomTokenizerFast` mirrors the behaviour of Hugging Face transformers' `BloomTokenizerFast`
(ids, offsets, padding, truncation, overflowing windows, decoding, save/load) without depending
on transformers. `train_bloom_tokenizer` builds a small tokenizer with BLOOM's exact pipeline, so
tests and demos can run without the model hub.

BLOOM's `tokenizer.json` (bigscience/tokenizer, shared by every BLOOM checkpoint) is:

* normalizer: none -- the text is tokenized exactly as given;
* pre-tokenizer: Sequence[Split(regex, "isolated"), ByteLevel(add_prefix_space=False,
  trim_offsets=True, use_regex=False)] -- the regex (see `BLOOM_SPLIT_REGEX`) cuts the text
  into words, the ByteLevel step only maps bytes to printable characters;
* model: BPE over the 256-byte alphabet, so no input ever needs `<unk>`;
* post-processor: ByteLevel(trim_offsets=False) -- it adds no special tokens, which is why BLOOM
  prompts carry no BOS/EOS, and it leaves the leading space inside each token's offsets;
* decoder: ByteLevel -- maps the printable characters back to bytes;
* special tokens `<unk>`, `<s>`, `</s>`, `<pad>` at ids 0, 1, 2, 3.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models
from tokenizers import pre_tokenizers, processors, trainers

__all__ = [
    "BLOOM_SPLIT_REGEX",
    "BLOOM_SPECIAL_TOKENS",
    "BatchEncoding",
    "BloomTokenizerFast",
    "train_bloom_tokenizer",
]

# The Split pattern of BLOOM's pre-tokenizer, verbatim from bigscience's tokenizer.json. A match
# is an optional single space followed by a run of characters that are neither whitespace nor
# one of `( | ) . , ! ? … 。 ， 、 । ۔ ،` (the class is written `[^(\s|[...])]`, so the
# parentheses and the bar are excluded too). With behaviour "isolated", matches and the gaps
# between them (whitespace runs, punctuation runs) both become pre-tokens, so a word keeps its
# leading space ("Ġworld") and punctuation of Latin, CJK, Devanagari and Arabic never merges
# with the word before it.
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"

# BLOOM's special tokens in id order: ids 0..3 in every BLOOM checkpoint.
BLOOM_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# transformers' "no limit" value for model_max_length (int(1e30)); BLOOM's tokenizer_config.json
# stores exactly this number, and anything above LARGE_INTEGER counts as "no limit".
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Files that mean "a slow (Python/pickled/sentencepiece) tokenizer is here, but no tokenizer.json".
_SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

_PADDING_STRATEGIES = {"longest", "max_length", "do_not_pad"}
_TRUNCATION_STRATEGIES = {"longest_first", "only_first", "only_second", "do_not_truncate"}

# The classic clean-up applied by `clean_up_tokenization_spaces=True` (a WordPiece-era rule set;
# BLOOM's config turns it off because it corrupts byte-level text such as "x ." in code).
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class BatchEncoding(dict):
    """Output of `BloomTokenizerFast.__call__`: a dict with attribute access and per-encoding helpers.

    Keys hold lists (or torch.long tensors with `return_tensors="pt"`), e.g. `input_ids` of shape
    (B, T) and `offset_mapping` of shape (B, T, 2). `encodings` keeps the `tokenizers.Encoding`
    of every row, which backs `tokens(i)`, `sequence_ids(i)`, `word_ids(i)` and `char_to_token`.
    """

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        encodings: Sequence[Encoding] | None = None,
        tensor_type: str | None = None,
    ):
        super().__init__(data or {})
        self._encodings = list(encodings) if encodings is not None else None
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        # Only plain keys are exposed as attributes; private and dunder names must raise so that
        # pickle/copy probing (`__setstate__`, `_encodings` before it is restored) works.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key {name!r} (keys: {list(self)})") from None

    @property
    def encodings(self) -> list[Encoding] | None:
        """The `tokenizers.Encoding` of each row (one per window when overflowing), or None."""
        return self._encodings

    def _encoding(self, batch_index: int) -> Encoding:
        if not self._encodings:
            raise ValueError("This BatchEncoding carries no tokenizers.Encoding objects.")
        return self._encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        """Token strings of row `batch_index` (pads included), length T."""
        return self._encoding(batch_index).tokens

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Per token of row `batch_index`: 0 for the first text, 1 for `text_pair`, None for pads/specials."""
        return self._encoding(batch_index).sequence_ids

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """Per token of row `batch_index`: index of the pre-tokenized word it comes from, None for pads/specials."""
        return self._encoding(batch_index).word_ids

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0) -> int | None:
        """Index of the token covering a character: `char_to_token(char)` or `char_to_token(row, char)`."""
        if char_index is None:
            batch_index, char_index = 0, batch_or_char_index
        else:
            batch_index = batch_or_char_index
        return self._encoding(batch_index).char_to_token(char_index, sequence_index)

    def convert_to_tensors(self, tensor_type: str | None) -> BatchEncoding:
        """Turn every value into a torch.long tensor in place (only `"pt"` is supported); returns self."""
        if tensor_type is None:
            return self
        if tensor_type != "pt":
            raise ValueError(f"return_tensors must be None or 'pt' (torch); got {tensor_type!r}")
        for key, value in list(self.items()):
            if isinstance(value, torch.Tensor):
                continue
            _check_rectangular(key, value)
            tensor = torch.tensor(value, dtype=torch.long)
            if key == "offset_mapping" and tensor.dim() < 3 and value and isinstance(value[0], list):
                # Rows of zero tokens lose the trailing pair dimension; restore (B, T, 2).
                tensor = tensor.reshape(len(value), -1, 2)
            self[key] = tensor
        return self

    def to(self, device: str | torch.device | int, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every tensor value to `device` in place; non-tensor values are left as they are. Returns self."""
        for key, value in list(self.items()):
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


def _check_rectangular(key: str, value: Any) -> None:
    """Raise a readable error when a list of rows cannot become one tensor (ragged lengths)."""
    if not isinstance(value, list) or not value or not isinstance(value[0], list):
        return
    lengths = [len(row) for row in value]
    if len(set(lengths)) > 1:
        raise ValueError(
            f"Cannot build a tensor for {key!r}: the sequences have different lengths {lengths}. "
            "Pass padding=True (or padding='max_length' with max_length=...) to pad them, "
            "or return_tensors=None to get lists."
        )


class BloomTokenizerFast:
    """BLOOM tokenizer: a `tokenizers.Tokenizer` plus transformers-compatible calling conventions.

    Construct it from a `tokenizers.Tokenizer` (the wrapper takes ownership and may reconfigure
    it), with `from_pretrained(directory)`, or with `train_bloom_tokenizer(...)`.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        unk_token: str | None = "<unk>",
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        pad_token: str | None = "<pad>",
        padding_side: str = "left",
        truncation_side: str = "right",
        add_prefix_space: bool | None = None,
        model_max_length: int = VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces: bool = False,
    ):
        """`add_prefix_space=None` keeps the tokenizer.json setting (False for BLOOM); True/False
        rewrites the ByteLevel pre-tokenizer when it differs."""
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}; "
                "use BloomTokenizerFast.from_pretrained(directory) to load from disk"
            )
        # A tokenizer.json may carry its own padding/truncation; like transformers we drive both
        # per call instead, so the backend starts (and always returns to) the unconfigured state.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        # The backend's padding/truncation are mutable global state; the lock keeps one call's
        # settings from leaking into a concurrent call (e.g. threads in a serving replica).
        self._lock = threading.Lock()

        file_setting = _byte_level_prefix_setting(_pre_tokenizer_json(tokenizer))
        if add_prefix_space is not None and file_setting is not None and bool(add_prefix_space) != file_setting:
            self._tokenizer = _with_prefix_space(tokenizer, bool(add_prefix_space))
        elif add_prefix_space and file_setting is None:
            warnings.warn("add_prefix_space=True ignored: the pre-tokenizer has no ByteLevel step to configure")
            add_prefix_space = False
        self.add_prefix_space = bool(add_prefix_space) if add_prefix_space is not None else bool(file_setting)

        self.unk_token = unk_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self._register_special_tokens()

        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

    # ------------------------------------------------------------------ configuration

    @property
    def padding_side(self) -> str:
        """Where pads go: "left" (BLOOM's default, so generation continues right after the prompt) or "right"."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        """Which end loses tokens when truncating: "right" (default) or "left"."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {value!r}")
        self._truncation_side = value

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (do not enable padding/truncation on it directly)."""
        return self._tokenizer

    def _register_special_tokens(self) -> None:
        # A special token string missing from the vocabulary (e.g. a custom pad token) is added
        # as a special token, as transformers does, so that it gets an id and is skipped on decode.
        missing = [
            AddedToken(token, special=True, normalized=False)
            for token in self.all_special_tokens
            if self._tokenizer.token_to_id(token) is None
        ]
        if missing:
            self._tokenizer.add_special_tokens(missing)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self.unk_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...} for the special tokens that are set."""
        return {key: getattr(self, key) for key in _SPECIAL_TOKEN_KEYS if getattr(self, key) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Special token strings in transformers' order (bos, eos, unk, pad), without duplicates."""
        tokens: list[str] = []
        for key in _SPECIAL_TOKEN_KEYS:
            token = getattr(self, key, None)
            if token is not None and token not in tokens:
                tokens.append(token)
        return tokens

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens`, same order."""
        return [self._tokenizer.token_to_id(token) for token in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"BloomTokenizerFast(vocab_size={self.vocab_size}, padding_side={self.padding_side!r}, "
            f"truncation_side={self.truncation_side!r}, add_prefix_space={self.add_prefix_space}, "
            f"special_tokens={self.special_tokens_map})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The lock cannot be pickled (Ray ships tokenizers to workers); everything else can.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        return_token_type_ids: bool = False,
    ) -> BatchEncoding:
        """Tokenize one text (or pair) or a batch of them.

        `text`: a str, or a list of B str. `text_pair`: same shape as `text` (second segment,
        e.g. the context in question answering). Returns a `BatchEncoding` with `input_ids` and
        `attention_mask` (+ `offset_mapping`, `token_type_ids`, `special_tokens_mask`, `length`,
        `overflow_to_sample_mapping` on request). Values are (B, T) lists, flat (T,) lists for a
        single str without tensors and without overflow, or torch.long tensors with
        `return_tensors="pt"` ((B, T); offsets (B, T, 2)). With truncation and
        `return_overflowing_tokens=True` each input becomes several rows, consecutive windows
        sharing `stride` tokens, and `overflow_to_sample_mapping[row]` is the input index.
        """
        batched = isinstance(text, (list, tuple))
        texts = _check_texts(text, "text")
        pairs = None
        if text_pair is not None:
            if batched != isinstance(text_pair, (list, tuple)):
                raise ValueError("text and text_pair must both be a str or both be lists of str")
            pairs = _check_texts(text_pair, "text_pair")
            if len(pairs) != len(texts):
                raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt' (torch); got {return_tensors!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_strategy, trunc_strategy, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of
        )

        inputs = list(zip(texts, pairs)) if pairs is not None else texts
        with self._lock:
            try:
                if trunc_strategy is not None:
                    self._tokenizer.enable_truncation(
                        max_length, stride=stride, strategy=trunc_strategy, direction=self.truncation_side
                    )
                if pad_strategy is not None:
                    self._tokenizer.enable_padding(
                        direction=side,
                        pad_id=self.pad_token_id,
                        pad_type_id=0,
                        pad_token=self.pad_token,
                        length=max_length if pad_strategy == "max_length" else None,
                        pad_to_multiple_of=pad_to_multiple_of,
                    )
                encodings = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except BaseException as error:
                # Impossible truncation settings (a stride not smaller than the room left for the
                # truncated text, a max_length shorter than the untruncated part) come back as a bare
                # Exception or a Rust panic (a BaseException); report both as a ValueError.
                if isinstance(error, Exception) or type(error).__name__ == "PanicException":
                    raise ValueError(f"Tokenization failed (check max_length/stride/truncation): {error}") from None
                raise
            finally:
                self._tokenizer.no_truncation()
                self._tokenizer.no_padding()

        rows: list[Encoding] = []
        sample_of_row: list[int] = []
        for sample, encoding in enumerate(encodings):
            # Windows beyond max_length come back as `overflowing`; they become extra rows, in order.
            windows = [encoding] + (list(encoding.overflowing) if return_overflowing_tokens else [])
            rows.extend(windows)
            sample_of_row.extend([sample] * len(windows))

        data: dict[str, Any] = {"input_ids": [row.ids for row in rows]}
        if return_token_type_ids:
            data["token_type_ids"] = [row.type_ids for row in rows]
        if return_attention_mask:
            data["attention_mask"] = [row.attention_mask for row in rows]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [row.special_tokens_mask for row in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [row.offsets for row in rows]
        if return_length:
            data["length"] = [len(row.ids) for row in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample_of_row

        if not batched and return_tensors is None and not return_overflowing_tokens:
            # One plain string: drop the batch dimension of per-token lists, like transformers
            # (which leaves `length` as a one-element list).
            data = {key: value[0] if value and isinstance(value[0], list) else value for key, value in data.items()}
        return BatchEncoding(data, rows, tensor_type=return_tensors)

    def _resolve_strategies(
        self, padding: Any, truncation: Any, max_length: int | None, pad_to_multiple_of: int | None
    ) -> tuple[str | None, str | None, int | None]:
        """Normalise padding/truncation arguments to ("longest"|"max_length"|None, strategy|None, max_length)."""
        # transformers' backward-compatible rule: a bare max_length means "truncate to it".
        if max_length is not None and padding is False and truncation is None:
            truncation = True

        if padding is True:
            pad_strategy = "longest"
        elif padding is False or padding is None:
            pad_strategy = "do_not_pad"
        elif isinstance(padding, str) and padding in _PADDING_STRATEGIES:
            pad_strategy = padding
        else:
            raise ValueError(
                f"Unknown padding strategy {padding!r}; use True/'longest', 'max_length' or False/'do_not_pad'"
            )
        if truncation is True:
            trunc_strategy = "longest_first"
        elif truncation is False or truncation is None:
            trunc_strategy = "do_not_truncate"
        elif isinstance(truncation, str) and truncation in _TRUNCATION_STRATEGIES:
            trunc_strategy = truncation
        else:
            raise ValueError(
                f"Unknown truncation strategy {truncation!r}; use True/'longest_first', 'only_first', "
                "'only_second' or False/None/'do_not_truncate'"
            )
        pad = None if pad_strategy == "do_not_pad" else pad_strategy
        trunc = None if trunc_strategy == "do_not_truncate" else trunc_strategy

        if pad == "longest" and max_length is not None and trunc is None:
            warnings.warn("max_length is ignored when padding=True without truncation; use padding='max_length'")
        bounded = self.model_max_length <= LARGE_INTEGER
        if max_length is None:
            if pad == "max_length":
                if not bounded:
                    raise ValueError(
                        "padding='max_length' needs max_length=... (this tokenizer has no model_max_length)"
                    )
                max_length = self.model_max_length
            if trunc is not None:
                if bounded:
                    max_length = self.model_max_length
                else:
                    trunc = None  # nothing to truncate to, as in transformers
        elif max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if pad is not None and self.pad_token_id is None:
            raise ValueError("Padding requested but the tokenizer has no pad token (pass pad_token='<pad>')")
        if pad is not None and trunc is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(
                f"max_length ({max_length}) must be a multiple of pad_to_multiple_of ({pad_to_multiple_of}) "
                "when truncating and padding together"
            )
        return pad, trunc, max_length

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """Token ids (length T) of one text, or of a text pair."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes one str, got {type(text).__name__}; use __call__ for batches")
        encoded = self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
            return_attention_mask=False,
        )
        return encoded["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """Token strings of one text (byte-level form: a leading space shows as "Ġ")."""
        encoded = self(text, pair, add_special_tokens=add_special_tokens, return_attention_mask=False)
        return encoded.tokens(0)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str] | None:
        """Id -> token string (None if unknown); a list of ids gives a list of strings."""
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self._tokenizer.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in _as_id_list(ids) if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        """Token string -> id (the unk id when unknown); a list gives a list."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: int | Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of one sequence of ids (an int, a list of T ints, or a 0-/1-D tensor).

        `clean_up_tokenization_spaces=None` uses the tokenizer's setting (False for BLOOM).
        """
        ids = _as_id_list(token_ids)
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._maybe_clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """Texts of B sequences (a list of id lists or a (B, T) tensor)."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"batch_decode expects a (B, T) tensor, got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        batch = [_as_id_list(sequence) for sequence in sequences]
        texts = self._tokenizer.decode_batch(batch, skip_special_tokens=skip_special_tokens)
        return [self._maybe_clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def _maybe_clean_up(self, text: str, clean_up: bool | None) -> str:
        if clean_up is None:
            clean_up = self.clean_up_tokenization_spaces
        if clean_up:
            for before, after in _CLEANUP_REPLACEMENTS:
                text = text.replace(before, after)
        return text

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> BloomTokenizerFast:
        """Load `directory/tokenizer.json` plus its `tokenizer_config.json` / `special_tokens_map.json`.

        Settings come from tokenizer_config.json, then special_tokens_map.json, then `overrides`
        (each later source wins). `directory` may also be the path of a tokenizer.json file.
        Only local paths are supported (there is no model hub access).
        """
        path = Path(directory)
        if path.is_file():
            tokenizer_file, config_dir = path, None
        elif path.is_dir():
            tokenizer_file, config_dir = path / TOKENIZER_FILE, path
            if not tokenizer_file.is_file():
                raise FileNotFoundError(_missing_tokenizer_message(path))
        else:
            raise FileNotFoundError(
                f"Tokenizer directory {str(path)!r} does not exist (only local directories containing "
                f"{TOKENIZER_FILE} are supported; there is no model hub download)"
            )

        settings: dict[str, Any] = {}
        if config_dir is not None:
            config = _read_json_object(config_dir / TOKENIZER_CONFIG_FILE)
            for key in ("padding_side", "truncation_side", "add_prefix_space", "model_max_length",
                        "clean_up_tokenization_spaces"):
                if config.get(key) is not None:
                    settings[key] = config[key]
            special_map = _read_json_object(config_dir / SPECIAL_TOKENS_MAP_FILE)
            for source in (config, special_map):
                for key in _SPECIAL_TOKEN_KEYS:
                    if key in source:
                        settings[key] = _token_content(source[key], key)
        if "model_max_length" in settings:
            # Some configs write the "no limit" value as a float (1e30).
            settings["model_max_length"] = int(settings["model_max_length"])
        settings.update(overrides)

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"Could not parse {tokenizer_file}: {error}") from error
        return cls(tokenizer, **settings)

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str, str]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

        The files load with `BloomTokenizerFast.from_pretrained` and with transformers'
        `PreTrainedTokenizerFast.from_pretrained` / `AutoTokenizer.from_pretrained`. Returns the three paths.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tokenizer_file = path / TOKENIZER_FILE
        config_file = path / TOKENIZER_CONFIG_FILE
        special_map_file = path / SPECIAL_TOKENS_MAP_FILE

        with self._lock:  # the backend is unconfigured outside calls, so no padding/truncation is saved
            self._tokenizer.save(str(tokenizer_file))
        config = {
            "tokenizer_class": "BloomTokenizerFast",
            "add_prefix_space": self.add_prefix_space,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.special_tokens_map,
        }
        _write_json(config_file, config)
        _write_json(special_map_file, self.special_tokens_map)
        return str(tokenizer_file), str(config_file), str(special_map_file)


# ---------------------------------------------------------------------- helpers


def _check_texts(value: Any, name: str) -> list[str]:
    """Return `value` as a list of str, or raise a ValueError naming the offending index and type."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(
                    f"{name}[{index}] must be a str, got {type(item).__name__} "
                    "(pre-tokenized word lists are not supported; join the words into a string)"
                )
        return list(value)
    raise ValueError(f"{name} must be a str or a list of str, got {type(value).__name__}")


def _as_id_list(token_ids: Any) -> list[int]:
    """Flatten an int / list / tuple / 0-D or 1-D tensor (or numpy array) of ids into a list of int."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() > 1:
            raise ValueError(
                f"decode expects one sequence, got a tensor of shape {tuple(token_ids.shape)}; use batch_decode"
            )
        return [int(i) for i in token_ids.reshape(-1).tolist()]
    if hasattr(token_ids, "tolist") and not isinstance(token_ids, (list, tuple)):
        token_ids = token_ids.tolist()  # numpy arrays and scalars
    if isinstance(token_ids, int):
        return [token_ids]
    ids = []
    for item in token_ids:
        if isinstance(item, (list, tuple)):
            raise ValueError("decode expects one sequence of ids, got nested lists; use batch_decode")
        ids.append(int(item))
    return ids


def _token_content(value: Any, key: str) -> str | None:
    """A special token from a config: a plain string, or a serialized AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"Cannot read special token {key!r} from config value {value!r}")


def _read_json_object(path: Path) -> dict[str, Any]:
    """Contents of an optional JSON object file ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _missing_tokenizer_message(directory: Path) -> str:
    message = f"No {TOKENIZER_FILE} in tokenizer directory {str(directory)!r}."
    slow_files = sorted(
        name
        for name in os.listdir(directory)
        if name in _SLOW_TOKENIZER_FILES or name.endswith((".pkl", ".pickle"))
    )
    if slow_files:
        message += (
            f" Only slow-tokenizer files were found ({', '.join(slow_files)}); this loader needs the fast "
            f"{TOKENIZER_FILE}. Convert them once with transformers (AutoTokenizer.from_pretrained(dir)"
            ".save_pretrained(dir)) and retry."
        )
    return message


def _pre_tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any] | None:
    """The serialized pre-tokenizer of `tokenizer` (None when it has none)."""
    pre_tokenizer = tokenizer.pre_tokenizer
    if pre_tokenizer is None:
        return None
    try:
        # The pickle state of a tokenizers component is its JSON; reading it avoids serializing
        # the whole 250k-entry vocabulary just to look at one flag.
        return json.loads(pre_tokenizer.__getstate__())
    except Exception:
        return json.loads(tokenizer.to_str()).get("pre_tokenizer")


def _byte_level_prefix_setting(node: Any) -> bool | None:
    """add_prefix_space of the first ByteLevel step in a serialized pre-tokenizer, None if there is none."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == "ByteLevel":
        return bool(node.get("add_prefix_space", False))
    for child in node.get("pretokenizers", []) or []:
        setting = _byte_level_prefix_setting(child)
        if setting is not None:
            return setting
    return None


def _set_byte_level_prefix(node: Any, value: bool) -> None:
    """Set add_prefix_space on every ByteLevel step of a serialized pre-tokenizer/decoder, in place."""
    if not isinstance(node, dict):
        return
    if node.get("type") == "ByteLevel":
        node["add_prefix_space"] = value
    for child in node.get("pretokenizers", []) or []:
        _set_byte_level_prefix(child, value)
    for child in node.get("decoders", []) or []:
        _set_byte_level_prefix(child, value)


def _with_prefix_space(tokenizer: Tokenizer, value: bool) -> Tokenizer:
    """A copy of `tokenizer` whose ByteLevel pre-tokenizer (and decoder) use add_prefix_space=value.

    transformers' BloomTokenizerFast makes the same edit to the serialized pre-tokenizer, so a word
    at the start of the text is encoded like a word after a space ("ĠHello" instead of "Hello").
    A JSON round trip through the public tokenizers API keeps this independent of its internals.
    """
    data = json.loads(tokenizer.to_str())
    _set_byte_level_prefix(data.get("pre_tokenizer"), value)
    _set_byte_level_prefix(data.get("decoder"), value)
    return Tokenizer.from_str(json.dumps(data))


# ---------------------------------------------------------------------- training


def train_bloom_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, *, min_frequency: int = 1
) -> BloomTokenizerFast:
    """Train a byte-level BPE tokenizer with BLOOM's exact pipeline on an iterable of strings.

    The result has BLOOM's special tokens at ids 0..3, all 256 byte symbols at the next ids (so
    any text in any script encodes without `<unk>`), then merges up to `vocab_size` entries
    (fewer if the corpus has no more pairs of `min_frequency` occurrences).
    """
    minimum = len(BLOOM_SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (4 special tokens + 256 bytes), got {vocab_size}")
    if isinstance(texts, str):
        texts = [texts]  # a bare string would otherwise be iterated character by character

    tokenizer = Tokenizer(models.BPE())
    # No normalizer: BLOOM tokenizes the raw text (no NFKC, no lowercasing).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Words with their optional leading space; whitespace and punctuation runs in between.
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            # Bytes -> printable characters only; use_regex=False because the Split above already
            # did the word splitting (GPT-2's own regex is not used by BLOOM).
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    # Adds no special tokens (BLOOM encodes without BOS/EOS); trim_offsets=False keeps the
    # leading space inside a token's character offsets, as BLOOM's file does.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        # Listed first so they get ids 0..3, as in BLOOM.
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in BLOOM_SPECIAL_TOKENS],
        # Every byte is a base symbol even if the corpus never contains it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BloomTokenizerFast(tokenizer)
