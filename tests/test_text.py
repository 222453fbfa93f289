"""asr.text: the evaluation normaliser, training-side cleaning, character and sentencepiece CTC vocabularies."""

from __future__ import annotations

import json

import pytest
import torch

from asr.config import TextConfig
from asr.decode import ctc_greedy
from asr.text import PAD, UNK, WORD_DELIMITER, CharVocab, PieceVocab, basic_normalize, clean_transcript, load_vocab
from asr.text import lower
from conftest import fixture_rows

DEMO_TEXT = TextConfig(lowercase=True, chars_to_ignore=',?.!;:"“”‘’%-')


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    """The fixture's training transcripts, cleaned as the demo experiment cleans them."""
    return [clean_transcript(r["sentence"], DEMO_TEXT, "tr") for r in fixture_rows("train")]


# ---------------------------------------------------------------------------------------
# Evaluation normaliser.

NORMALIZER_CASES = [
    "Hello, World!",
    "  Extra   spaces\tand\nnewlines  ",
    "Brackets [noise] and <unk> tags",
    "Parentheses (aside) stay out (twice) here",
    "Nested (a (b) c) and unclosed (paren",
    "İstanbul'da IŞIK ılık, Çağrı!",
    "Şu an saat 10:45; sıcaklık %23.",
    "Größe Straße ÄÖÜ: „Anführungszeichen“ – Gedankenstrich",
    "Numbers 1,000.5 and 3rd 42nd",
    "café naïve coöperate ﬁ ligature ½ ²",
    "em—dash…ellipsis «guillemets» ‘single’ “double”",
    "emoji 🙂 and math ∑ ± ×",
    "tab\tand\u00a0nbsp\u2009thin",
    "",
    "   ",
    "UPPER lower MiXeD",
    "a-b_c/d\\e|f",
    "日本語のテキスト、句読点。",
]


@pytest.mark.parametrize("text", NORMALIZER_CASES)
def test_basic_normalize_matches_whisper_basic_text_normalizer(text):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    assert basic_normalize(text) == BasicTextNormalizer()(text)


# ---------------------------------------------------------------------------------------
# Case and cleaning.


@pytest.mark.parametrize("language", ["tr", "az", "tr-TR", "tr_TR", "TR"])
def test_turkic_lowercasing(language):
    assert lower("IŞIK İSTANBUL Iğdır", language) == "ışık istanbul ığdır"


@pytest.mark.parametrize("language", ["", "en", "de", "fr"])
def test_other_languages_lowercase_as_usual(language):
    assert lower("IRIS", language) == "iris"
    assert lower("İ", language) == "İ".lower()  # Python's default, untouched


def test_clean_transcript_bare_character_list():
    cfg = TextConfig(chars_to_ignore=',?.!-"')
    assert clean_transcript('Evet, hayır? "Belki"... bilmem-ki!', cfg) == "Evet hayır Belki bilmemki"


def test_clean_transcript_regex():
    cfg = TextConfig(chars_to_ignore=r'[\,\?\.\!\-\;\:\"\“\%\‘\”\�\']')
    assert clean_transcript("Ali'nin evi, değil mi?", cfg) == "Alinin evi değil mi"
    assert clean_transcript("a1b22c", TextConfig(chars_to_ignore=r"\d+")) == "abc"


def test_clean_transcript_replacements_case_and_whitespace():
    cfg = TextConfig(replace={"â": "a", "î": "i", "û": "u"}, lowercase=True, chars_to_ignore=".")
    assert clean_transcript("  Kâğıt   İMÂN\tHûkûm. ", cfg, "tr") == "kağıt iman hukum"
    # decomposed input (a + combining circumflex) is composed first, so the table still applies
    assert clean_transcript("ka\u0302ğıt", cfg, "tr") == "kağıt"


def test_clean_transcript_turkish_lowercase_only_for_turkic():
    cfg = TextConfig(lowercase=True)
    assert clean_transcript("Işık", cfg, "tr") == "ışık"
    assert clean_transcript("Işık", cfg, "en") == "işık"


def test_clean_transcript_without_collapsing_whitespace():
    cfg = TextConfig(collapse_whitespace=False, chars_to_ignore=",")
    assert clean_transcript(" a,  b ", cfg) == " a  b "


def test_clean_transcript_defaults_leave_text_alone():
    assert clean_transcript("Merhaba, Dünya!", TextConfig()) == "Merhaba, Dünya!"


# ---------------------------------------------------------------------------------------
# Character vocabulary <-> Wav2Vec2CTCTokenizer.


@pytest.fixture(scope="module")
def char_vocab_and_tokenizer(train_texts, tmp_path_factory):
    from transformers import Wav2Vec2CTCTokenizer

    folder = tmp_path_factory.mktemp("charvocab")
    vocab = CharVocab.build(train_texts)
    vocab.save(folder)
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                                     word_delimiter_token="|")
    return vocab, tokenizer, folder


def test_char_vocab_layout(char_vocab_and_tokenizer, train_texts):
    vocab, _, folder = char_vocab_and_tokenizer
    index = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert index[PAD] == 0 == vocab.blank and index[UNK] == 1 == vocab.unk and index[WORD_DELIMITER] == 2
    assert sorted(index.values()) == list(range(len(vocab)))
    assert " " not in index
    assert set(index) - {PAD, UNK, WORD_DELIMITER} == {c for t in train_texts for c in t} - {" "}
    assert "ı" in index and "I" not in index  # Turkish lower-casing happened


def test_char_vocab_encodes_like_the_tokenizer(char_vocab_and_tokenizer, train_texts):
    vocab, tokenizer, _ = char_vocab_and_tokenizer
    for text in train_texts + ["bilinmeyen q x harfler", "tek"]:
        assert vocab.encode(text) == tokenizer(text).input_ids, text


def ctc_path(ids: list[int], blank: int) -> list[int]:
    """A frame-level CTC path for `ids`: each label held for 1-3 frames, blanks between and around."""
    path = [blank]
    for k, i in enumerate(ids):
        path += [i] * (1 + k % 3) + ([blank] if k % 2 or (k + 1 < len(ids) and ids[k + 1] == i) else [])
    return path + [blank, blank]


def test_char_vocab_decodes_like_the_tokenizer(char_vocab_and_tokenizer, train_texts):
    vocab, tokenizer, _ = char_vocab_and_tokenizer
    for text in train_texts:
        path = ctc_path(vocab.encode(text), vocab.blank)
        logits = torch.nn.functional.one_hot(torch.tensor(path), len(vocab)).float()[None]  # (1, T, V)
        (ids,) = ctc_greedy(logits, torch.tensor([len(path)]), vocab.blank)
        assert vocab.decode(ids) == tokenizer.decode(path) == text


def test_char_vocab_decode_collapses_blank_separated_word_delimiters(char_vocab_and_tokenizer):
    vocab, tokenizer, _ = char_vocab_and_tokenizer
    a, b, bar = vocab.index["a"], vocab.index["b"], vocab.index[WORD_DELIMITER]
    path = [a, bar, vocab.blank, bar, b]  # "a||b" after the collapse: two word breaks in a row
    (ids,) = ctc_greedy(torch.nn.functional.one_hot(torch.tensor(path), len(vocab)).float()[None],
                        torch.tensor([len(path)]), vocab.blank)
    assert vocab.decode(ids) == "a b"
    assert " ".join(tokenizer.decode(path).split()) == "a b"  # the tokenizer leaves a double space


def test_char_vocab_unknown_characters(char_vocab_and_tokenizer):
    vocab, tokenizer, _ = char_vocab_and_tokenizer
    ids = vocab.encode("aqa")
    assert ids[1] == vocab.unk
    assert vocab.decode(ids) == tokenizer.decode(ids) == "a[UNK]a"


def test_char_vocab_save_load_round_trip(char_vocab_and_tokenizer):
    vocab, _, folder = char_vocab_and_tokenizer
    loaded = load_vocab(folder)
    assert isinstance(loaded, CharVocab) and loaded.tokens == vocab.tokens


# ---------------------------------------------------------------------------------------
# Sentencepiece units.


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_piece_vocab_builds_encodes_and_decodes(train_texts, tmp_path, model_type):
    vocab = PieceVocab.build(train_texts, vocab_size=64, model_type=model_type)
    assert vocab.blank == 0 and vocab.tokens[0] == PAD
    assert vocab.unk == 1 and vocab.tokens[1] == UNK
    assert 10 < len(vocab) <= 64
    for text in train_texts:
        ids = vocab.encode(text)
        assert ids and 0 not in ids and all(0 <= i < len(vocab) for i in ids)
        assert vocab.decode(ids) == text
    assert sum(len(vocab.encode(t)) for t in train_texts) < sum(len(t) for t in train_texts)  # units, not chars
    vocab.save(tmp_path)
    loaded = load_vocab(tmp_path)
    assert isinstance(loaded, PieceVocab) and loaded.tokens == vocab.tokens
    assert loaded.encode(train_texts[0]) == vocab.encode(train_texts[0])
    index = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert index[PAD] == 0 and len(index) == len(vocab)


def test_piece_vocab_caps_the_size_on_a_tiny_corpus(train_texts):
    vocab = PieceVocab.build(train_texts[:3], vocab_size=5000, model_type="unigram")
    assert vocab.blank == 0
    assert all(vocab.decode(vocab.encode(t)) == t for t in train_texts[:3])
