"""Parity tests for bloom.tokenizer against transformers' fast tokenizer (test-only reference).

transformers 5.x has no BloomTokenizerFast class; its generic fast tokenizer loaded from the same
tokenizer.json is the reference. No model hub here, so a BLOOM-style tokenizer is trained on a
small generated multilingual corpus.
"""

import json
import random

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from bloom.tokenizer import BLOOM_SPLIT_REGEX, BatchEncoding, BloomTokenizerFast, train_bloom_tokenizer

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# Texts used for parity checks: every script of the corpus plus some it never saw (Greek, Korean,
# Japanese, Thai, ZWJ emoji), and awkward whitespace.
TEXTS = [
    "Hello world, this is BLOOM! How are you today?",
    "Bonjour le monde. Ça va très bien, merci… Où est la gare ?",
    "你好，世界。我们今天学习语言模型、分词器。",
    "مرحبا بالعالم، كيف حالك؟ هذا نموذج لغوي۔",
    "नमस्ते दुनिया। आप कैसे हैं? यह एक भाषा मॉडल है।",
    "Привет, мир! Как дела? Это языковая модель.",
    "Emoji time 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family (zwj) 🇫🇷",
    "def add(x, y):\n    return x + y  # sum\n\n\tprint(add(1, 2))",
    "   leading spaces and trailing   ",
    "multiple     spaces\n\n\nnewlines\r\nand\ttabs",
    "Γειά σου κόσμε! 안녕하세요 세계. こんにちは、世界。สวัสดีชาวโลก",
    "x",
    "",
]

QUESTIONS = [
    "Where is the model trained?",
    "Quelle est la capitale de la France ?",
    "模型在哪里训练？",
]
CONTEXTS = [
    "The BLOOM model was trained on the Jean Zay supercomputer near Paris, France, "
    "using 46 natural languages and 13 programming languages over several months.",
    "Paris est la capitale de la France. Elle est connue pour la tour Eiffel, "
    "le Louvre et ses cafés. La Seine traverse la ville.",
    "该模型在法国巴黎附近的超级计算机上训练，使用了多种自然语言和编程语言。训练持续了几个月。",
]


def _corpus():
    """A few hundred deterministic lines in several scripts, with code, emoji and odd whitespace."""
    rng = random.Random(1234)
    words = {
        "en": "the model language data train token world hello small large quick brown fox".split(),
        "fr": "le la modèle langue données monde bonjour très petit grand rapide où ça".split(),
        "zh": ["模型", "语言", "数据", "训练", "世界", "你好", "分词", "我们", "今天", "学习"],
        "ar": "مرحبا العالم نموذج لغة بيانات تدريب كيف حالك هذا".split(),
        "hi": "नमस्ते दुनिया भाषा मॉडल डेटा प्रशिक्षण आप कैसे हैं यह".split(),
        "ru": "привет мир модель язык данные обучение как дела это".split(),
        "emoji": ["😀", "🎉", "👍", "🚀", "❤️", "🌍", "👍🏽"],
    }
    separators = {"zh": "", "ar": " ", "hi": " ", "emoji": " "}
    punctuation = {"zh": "。，、", "ar": "،۔؟", "hi": "।?", "emoji": "!"}
    lines = []
    for i in range(360):
        lang = list(words)[i % len(words)]
        pieces = rng.choices(words[lang], k=rng.randint(3, 12))
        line = separators.get(lang, " ").join(pieces) + rng.choice(punctuation.get(lang, ".,!?…"))
        if i % 9 == 0:
            line = "  " + line + "   "
        if i % 11 == 0:
            line += "\n\n"
        lines.append(line)
    for i in range(40):
        lines.append(f"def f_{i}(x):\n    return x * {i} + 1  # comment\n\n\tif x:  pass")
    return lines


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """Directory holding the trained tokenizer's files (ours, default settings)."""
    directory = tmp_path_factory.mktemp("bloom_tok")
    tokenizer = train_bloom_tokenizer(_corpus(), vocab_size=1200)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tok(trained_dir):
    return BloomTokenizerFast.from_pretrained(trained_dir)


def _reference(path, padding_side="left", **kwargs):
    return PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side=padding_side, **SPECIALS, **kwargs)


@pytest.fixture(scope="module")
def ref(trained_dir):
    return _reference(trained_dir / "tokenizer.json")


def plain(value):
    """Tensors -> lists, tuples -> lists, recursively, so ours and the reference compare with ==."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def assert_same(ours, theirs):
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs:
        assert plain(ours[key]) == plain(theirs[key]), key


def test_trained_tokenizer_has_bloom_structure(tok):
    data = json.loads(tok.backend_tokenizer.to_str())
    assert data["normalizer"] is None
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert data["pre_tokenizer"]["type"] == "Sequence"
    assert split == {"type": "Split", "pattern": {"Regex": BLOOM_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert data["post_processor"]["type"] == "ByteLevel" and data["post_processor"]["trim_offsets"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE"
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == [
        (0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (3, "<pad>", True)
    ]
    # All 256 byte symbols are in the vocabulary, plus learned merges.
    assert 4 + 256 < tok.vocab_size <= 1200


def test_special_tokens_and_vocab(tok, ref):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert tok.all_special_tokens == ref.all_special_tokens
    assert tok.all_special_ids == ref.all_special_ids
    assert tok.vocab_size == ref.vocab_size and len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.padding_side == "left" and tok.truncation_side == "right"
    assert tok.model_max_length == ref.model_max_length


def test_no_special_tokens_added_by_default(tok, ref):
    text = TEXTS[0]
    ids = tok.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text)
    assert not set(ids) & {0, 1, 2, 3}
    assert tok(text)["input_ids"] == ids
    assert tok(text, return_special_tokens_mask=True)["special_tokens_mask"] == [0] * len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_single_text_matches_reference(tok, ref, text):
    kwargs = dict(return_offsets_mapping=True, return_length=True)
    ours, theirs = tok(text, **kwargs), ref(text, **kwargs)
    assert_same(ours, theirs)
    assert isinstance(ours["input_ids"], list) and all(isinstance(i, int) for i in ours["input_ids"])
    assert 0 not in ours["input_ids"]  # byte-level BPE never needs <unk>
    assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.convert_ids_to_tokens(ours["input_ids"]) == theirs.tokens()
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ours["input_ids"]
    assert ours.word_ids() == theirs.word_ids()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_batch_padding_matches_reference(trained_dir, side, return_tensors):
    tok = BloomTokenizerFast.from_pretrained(trained_dir, padding_side=side)
    ref = _reference(trained_dir / "tokenizer.json", padding_side=side)
    kwargs = dict(padding=True, return_offsets_mapping=True, return_tensors=return_tensors)
    ours, theirs = tok(TEXTS, **kwargs), ref(TEXTS, **kwargs)
    assert_same(ours, theirs)
    for i in range(len(TEXTS)):
        assert ours.sequence_ids(i) == theirs.sequence_ids(i)

    ids, mask, offsets = (plain(ours[k]) for k in ("input_ids", "attention_mask", "offset_mapping"))
    shortest = min(range(len(TEXTS)), key=lambda i: sum(mask[i]))
    n_pad = len(mask[shortest]) - sum(mask[shortest])
    assert n_pad > 0
    pad_slice = slice(0, n_pad) if side == "left" else slice(len(mask[shortest]) - n_pad, None)
    assert ids[shortest][pad_slice] == [3] * n_pad
    assert mask[shortest][pad_slice] == [0] * n_pad
    assert offsets[shortest][pad_slice] == [[0, 0]] * n_pad
    if return_tensors == "pt":
        assert ours["input_ids"].dtype == torch.long
        assert ours["offset_mapping"].shape == (len(TEXTS), len(ids[0]), 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(truncation=True, max_length=7),
        dict(max_length=5),  # a bare max_length truncates, like the reference
        dict(truncation="longest_first", max_length=9, padding="max_length"),
        dict(truncation=True, max_length=6, padding="max_length", return_tensors="pt"),
        dict(padding="max_length", max_length=64, return_tensors="pt", return_token_type_ids=True),
        dict(truncation=True, max_length=8, return_overflowing_tokens=True, stride=2),
    ],
    ids=["trunc", "bare-max-length", "trunc-pad", "trunc-pad-pt", "pad-64-pt", "overflow"],
)
def test_truncation_matches_reference(tok, ref, kwargs):
    ours = tok(TEXTS[:8], return_offsets_mapping=True, **kwargs)
    theirs = ref(TEXTS[:8], return_offsets_mapping=True, **kwargs)
    assert_same(ours, theirs)
    limit = kwargs["max_length"]
    assert all(len(row) <= limit for row in plain(ours["input_ids"]))


def test_truncation_side_left(trained_dir):
    tok = BloomTokenizerFast.from_pretrained(trained_dir, truncation_side="left")
    ref = _reference(trained_dir / "tokenizer.json", truncation_side="left")
    assert_same(tok(TEXTS[:4], truncation=True, max_length=5), ref(TEXTS[:4], truncation=True, max_length=5))
    assert tok(TEXTS[0], max_length=3)["input_ids"] == tok.encode(TEXTS[0])[-3:]


def test_pairs_with_stride_and_overflow_match_reference(tok, ref):
    kwargs = dict(
        truncation="only_second",
        max_length=48,
        stride=8,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    ours, theirs = tok(QUESTIONS, CONTEXTS, **kwargs), ref(QUESTIONS, CONTEXTS, **kwargs)
    assert_same(ours, theirs)
    rows = len(ours["input_ids"])
    assert rows > len(QUESTIONS)  # every context overflowed into several windows
    assert sorted(set(ours["overflow_to_sample_mapping"])) == [0, 1, 2]
    for row in range(rows):
        assert ours.sequence_ids(row) == theirs.sequence_ids(row)
        assert ours.word_ids(row) == theirs.word_ids(row)
        assert set(ours.sequence_ids(row)) <= {0, 1, None}

    # Consecutive windows of one sample share `stride` context tokens.
    def context_ids(row):
        return [t for t, s in zip(ours["input_ids"][row], ours.sequence_ids(row)) if s == 1]

    first, second = context_ids(0), context_ids(1)
    assert ours["overflow_to_sample_mapping"][:2] == [0, 0]
    assert first[-8:] == second[:8]

    # Tensor output of the same call has one row per window.
    as_pt = tok(QUESTIONS, CONTEXTS, return_tensors="pt", **kwargs)
    assert as_pt["input_ids"].shape == (rows, 48)
    assert as_pt["offset_mapping"].shape == (rows, 48, 2)
    assert as_pt["overflow_to_sample_mapping"].tolist() == ours["overflow_to_sample_mapping"]


def test_single_pair_matches_reference(tok, ref):
    kwargs = dict(truncation="only_second", max_length=20, stride=4, return_overflowing_tokens=True,
                  return_offsets_mapping=True)
    ours, theirs = tok(QUESTIONS[0], CONTEXTS[0], **kwargs), ref(QUESTIONS[0], CONTEXTS[0], **kwargs)
    assert_same(ours, theirs)
    assert isinstance(ours["input_ids"][0], list)  # overflow keeps the window dimension
    plain_pair = tok(QUESTIONS[1], CONTEXTS[1], return_offsets_mapping=True)
    assert_same(plain_pair, ref(QUESTIONS[1], CONTEXTS[1], return_offsets_mapping=True))


def test_decode_round_trip(tok, ref):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
        assert tok.decode(ids) == ref.decode(ids)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == TEXTS
    with_pads = tok.batch_decode(batch["input_ids"])
    assert with_pads == ref.batch_decode(batch["input_ids"].tolist())
    assert any(text.startswith("<pad>") for text in with_pads)
    assert tok.decode([3, 3] + tok.encode("hi"), skip_special_tokens=True) == "hi"
    assert tok.decode(tok.encode("a .")) == "a ."  # BLOOM does no clean-up by default
    assert tok.decode(tok.encode("a ."), clean_up_tokenization_spaces=True) == "a."


def _json_with_prefix_space(source, target):
    data = json.loads(source.read_text(encoding="utf-8"))
    for step in data["pre_tokenizer"]["pretokenizers"]:
        if step["type"] == "ByteLevel":
            step["add_prefix_space"] = True
    target.write_text(json.dumps(data), encoding="utf-8")
    return target


def test_add_prefix_space_matches_reference(trained_dir, tmp_path, tok):
    # transformers' BloomTokenizerFast(add_prefix_space=True) rewrites the ByteLevel pre-tokenizer;
    # the reference is the generic fast tokenizer on a tokenizer.json with that rewrite applied.
    ref_prefixed = _reference(_json_with_prefix_space(trained_dir / "tokenizer.json", tmp_path / "t.json"))
    ours = BloomTokenizerFast.from_pretrained(trained_dir, add_prefix_space=True)
    assert ours.add_prefix_space is True
    for text in ["Hello world", TEXTS[1], TEXTS[2]]:
        kwargs = dict(return_offsets_mapping=True)
        assert_same(ours(text, **kwargs), ref_prefixed(text, **kwargs))
    assert ours.tokenize("world")[0].startswith("Ġ")
    assert ours.encode("world") != tok.encode("world")

    # The setting survives save/load and is read back from tokenizer_config.json.
    ours.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_prefix_space"] is True
    reloaded = BloomTokenizerFast.from_pretrained(tmp_path / "saved")
    assert reloaded.add_prefix_space is True and reloaded.encode("world") == ours.encode("world")
    # An explicit False rewrites the pre-tokenizer back.
    assert BloomTokenizerFast.from_pretrained(tmp_path / "saved", add_prefix_space=False).encode("world") == tok.encode(
        "world"
    )


def test_save_and_load_round_trip(trained_dir, tmp_path):
    source = BloomTokenizerFast.from_pretrained(trained_dir, padding_side="right", model_max_length=16)
    directory = tmp_path / "saved"
    paths = source.save_pretrained(directory)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"
    ]
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "BloomTokenizerFast" and config["padding_side"] == "right"

    ours = BloomTokenizerFast.from_pretrained(directory)
    theirs = PreTrainedTokenizerFast.from_pretrained(str(directory))
    assert ours.padding_side == theirs.padding_side == "right"
    assert ours.model_max_length == theirs.model_max_length == 16
    assert ours.all_special_ids == theirs.all_special_ids == [1, 2, 0, 3]
    assert ours.get_vocab() == source.get_vocab()
    kwargs = dict(padding=True, truncation=True, return_offsets_mapping=True)
    assert_same(ours(TEXTS, **kwargs), theirs(TEXTS, **kwargs))
    # padding="max_length" without max_length falls back to model_max_length from the config.
    assert all(len(row) == 16 for row in ours(TEXTS, padding="max_length", truncation=True)["input_ids"])
    # Overrides beat the config files.
    assert BloomTokenizerFast.from_pretrained(directory, padding_side="left").padding_side == "left"


def test_from_pretrained_reads_hand_written_configs(trained_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((trained_dir / "tokenizer.json").read_bytes())
    # BLOOM's hub files: special tokens as strings or AddedToken dicts, a float-ish max length.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BloomTokenizerFast",
        "padding_side": "right",
        "model_max_length": 1e30,
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": "<pad>",
    }))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>", "pad_token": "<pad>"
    }))
    ours = BloomTokenizerFast.from_pretrained(tmp_path)
    assert ours.padding_side == "right"
    assert ours.model_max_length == int(1e30)
    assert (ours.unk_token, ours.eos_token, ours.eos_token_id) == ("<unk>", "</s>", 2)
    padded = ours(["a", "a b c"], padding=True)["attention_mask"]
    assert padded[0][0] == 1 and padded[0][-1] == 0  # right padding from the config


def test_batch_encoding_helpers(tok):
    enc = tok(["Hello world", "Bonjour"], padding=True, return_tensors="pt", return_offsets_mapping=True)
    assert isinstance(enc, BatchEncoding) and isinstance(enc, dict)
    assert enc.input_ids is enc["input_ids"]
    assert enc.to("cpu") is enc and enc.input_ids.device.type == "cpu"
    assert enc.tokens(0) == tok.convert_ids_to_tokens(enc.input_ids[0].tolist())
    token = enc.char_to_token(0, 6)  # the "w" of "world"
    start, end = enc.offset_mapping[0, token].tolist()
    assert start <= 6 < end
    with pytest.raises(AttributeError):
        enc.not_a_key


def test_error_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        BloomTokenizerFast.from_pretrained(tmp_path)
    assert "tokenizer.json" in str(info.value) and str(tmp_path) in str(info.value)

    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="slow-tokenizer files.*merges.txt, vocab.json"):
        BloomTokenizerFast.from_pretrained(tmp_path)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        BloomTokenizerFast.from_pretrained(tmp_path / "nope")


def test_error_non_string_input(tok):
    with pytest.raises(ValueError, match=r"text\[1\] must be a str, got int"):
        tok(["fine", 42])
    with pytest.raises(ValueError, match=r"text_pair\[0\] must be a str, got NoneType"):
        tok(["q"], [None])
    with pytest.raises(ValueError, match="got bytes"):
        tok(b"bytes")


def test_error_ragged_tensors_and_bad_strategies(tok):
    with pytest.raises(ValueError, match="different lengths.*padding=True"):
        tok(["one", "two words here"], return_tensors="pt")
    with pytest.raises(ValueError, match="max_length"):
        tok(["one"], padding="max_length")
    with pytest.raises(ValueError, match="Unknown padding strategy"):
        tok("x", padding="sideways")
    with pytest.raises(ValueError, match="Unknown truncation strategy"):
        tok("x", truncation="middle", max_length=3)
    with pytest.raises(ValueError, match="return_tensors"):
        tok("x", return_tensors="np")
    with pytest.raises(ValueError, match="stride"):  # stride must be smaller than the room for the context
        tok("a b c", "d e f g h i j", truncation="only_second", max_length=6, stride=5, return_overflowing_tokens=True)
