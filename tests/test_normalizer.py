"""asr.text.normalize, the script-aware evaluation normaliser ("script"), against Whisper's
BasicTextNormalizer ("basic"): Dhivehi (Thaana), Hindi (Devanagari), Turkish, German, English."""

from __future__ import annotations

import unicodedata
from collections import Counter

import jiwer
import pytest

from asr.config import ConfigError, EvalConfig, load_config
from asr.text import NORMALIZERS, basic_normalize, normalize

MARK_CATEGORIES = ("Mn", "Mc", "Me")


def marks(text: str) -> Counter:
    return Counter(c for c in text if unicodedata.category(c) in MARK_CATEGORIES)


def wer(ref: str, hyp: str, name: str, language: str = "") -> float:
    """Word error rate (percent) of one pair after normaliser `name`, with jiwer as asr.metrics scores."""
    norm = NORMALIZERS[name]
    return 100.0 * jiwer.wer(norm(ref, language), norm(hyp, language))


# ---------------------------------------------------------------------------------------
# Registry and configuration.


def test_registry_and_default():
    assert NORMALIZERS["script"] is normalize
    assert NORMALIZERS["basic"] is basic_normalize
    assert EvalConfig().normalizer == "script"
    assert load_config(overrides=["eval.normalizer=basic"]).eval.normalizer == "basic"
    with pytest.raises(ConfigError, match="eval.normalizer"):
        load_config(overrides=["eval.normalizer=whisper"])


def test_one_argument_call_still_works():
    # asr.metrics calls NORMALIZERS[name](text) today.
    for name, norm in NORMALIZERS.items():
        assert norm("Hello, World!") == norm("Hello, World!", "") != "Hello, World!"


@pytest.mark.parametrize("text", ["İstanbul'da IŞIK ılık, Çağrı!", "ދިވެހިރާއްޖެ", "हिन्दी", "Größe", ""])
def test_basic_keeps_whisper_behaviour_with_a_language_argument(text):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    assert basic_normalize(text, "tr") == basic_normalize(text) == BasicTextNormalizer()(text)


# ---------------------------------------------------------------------------------------
# Thaana (Dhivehi).

DHIVEHI = ["ދިވެހިރާއްޖެ", "ދިވެހި ބަސް", "މާލެ އަކީ ދިވެހިރާއްޖޭގެ ވެރިރަށް."]


@pytest.mark.parametrize("text", DHIVEHI)
def test_thaana_fili_and_sukun_are_kept(text):
    out = normalize(text, "dv")
    assert marks(out) == marks(text) and marks(text)
    assert out == " ".join(text.replace(".", " ").split())  # only the full stop goes
    assert len(out.split()) == len(text.split())  # no word is split at a mark
    # Whisper's normaliser deletes every fili and sukun, and splits the word letter by letter.
    assert not marks(basic_normalize(text))
    assert len(basic_normalize(text).split()) > len(text.split())


def test_thaana_words_that_differ_in_a_fili_are_different_words():
    ref, hyp = "ދިވެހި ބަސް", "ދިވެހި ބުސް"  # the second word differs only in its vowel sign (ަ vs ު)
    diff = [i for i, (a, b) in enumerate(zip(ref, hyp)) if a != b]
    assert len(ref) == len(hyp) and len(diff) == 1 and {unicodedata.category(s[diff[0]]) for s in (ref, hyp)} == {"Mn"}
    assert basic_normalize(ref) == basic_normalize(hyp)  # the flattering score: a wrong word counts as right
    assert wer(ref, hyp, "basic") == 0.0
    assert wer(ref, hyp, "script", "dv") == pytest.approx(50.0)  # one of two words wrong
    assert wer(ref, ref, "script", "dv") == 0.0


# ---------------------------------------------------------------------------------------
# Devanagari (Hindi).


@pytest.mark.parametrize("text", ["नमस्ते दुनिया", "हिन्दी", "क्षत्रिय", "संस्कृत में।"])
def test_devanagari_matras_viramas_and_anusvara_are_kept(text):
    out = normalize(text, "hi")
    assert marks(out) == marks(text) and marks(text)
    assert len(out.split()) == len(text.split())
    assert not marks(basic_normalize(text))


def test_hindi_vowel_signs_examples():
    assert normalize("नमस्ते दुनिया") == "नमस्ते दुनिया"
    assert normalize("हिन्दी") == "हिन्दी"
    assert basic_normalize("हिन्दी").split() == ["ह", "न", "द"]
    assert normalize("संस्कृत में।") == "संस्कृत में"  # the danda is punctuation


def test_hindi_words_that_differ_in_a_matra_are_different_words():
    ref, hyp = "दिन अच्छा है", "दीन अच्छा है"  # din (day) vs deen (poor): ि vs ी
    diff = [i for i, (a, b) in enumerate(zip(ref, hyp)) if a != b]
    assert len(ref) == len(hyp) and len(diff) == 1 and {unicodedata.category(s[diff[0]]) for s in (ref, hyp)} == {"Mc"}
    assert basic_normalize(ref) == basic_normalize(hyp)
    assert wer(ref, hyp, "basic") == 0.0
    assert wer(ref, hyp, "script", "hi") == pytest.approx(100.0 / 3)


@pytest.mark.parametrize("text", [
    "ภาษาไทย ที่นี่",  # Thai vowel and tone marks
    "বাংলা ভাষা",  # Bengali
    "தமிழ் மொழி",  # Tamil
    "עִבְרִית",  # Hebrew with points
    "العَرَبِيَّة",  # Arabic with harakat
])
def test_other_scripts_keep_their_marks(text):
    assert marks(normalize(text)) == marks(unicodedata.normalize("NFC", text))


# ---------------------------------------------------------------------------------------
# Turkish: dotted and dotless i, apostrophes.


def test_turkish_dotted_capital_i_does_not_split_words():
    assert normalize("İstanbul'da IŞIK", "tr") == "istanbulda ışık"
    assert normalize("İstanbul'da IŞIK") == "istanbulda işik"  # no language: I -> i, but İ still whole
    assert "\u0307" not in normalize("İSTANBUL İzmir")
    assert normalize("İSTANBUL İzmir") == "istanbul izmir"
    assert basic_normalize("İstanbul'da IŞIK") == "i stanbul da işik"  # what Whisper's does


def test_turkish_dotless_and_dotted_lowercase():
    assert normalize("Iğdır ILIK İzmir ıhlamur", "tr") == "ığdır ılık izmir ıhlamur"
    assert normalize("Iğdır", "az") == "ığdır"
    # Decomposed input (I + combining dot above) is composed first.
    assert normalize("I\u0307stanbul", "tr") == normalize("İstanbul", "tr") == "istanbul"


def test_turkish_wer_no_longer_counts_the_dot_of_capital_i():
    assert wer("İstanbul'da yağmur", "istanbulda yağmur", "script", "tr") == 0.0
    assert wer("İstanbul'da yağmur", "istanbulda yağmur", "basic") > 0.0


@pytest.mark.parametrize("variant", ["Türkiye'nin", "Türkiye’nin", "Türkiyeʼnin", "Türkiyenin", "TÜRKİYE'NİN"])
def test_apostrophe_inside_a_word_is_removed_without_splitting(variant):
    assert normalize(variant, "tr") == "türkiyenin"


def test_apostrophes_outside_words_are_punctuation():
    assert normalize("'Evet' dedi", "tr") == "evet dedi"
    assert normalize("rock 'n' roll") == "rock n roll"
    assert normalize("the students' books") == "the students books"


# ---------------------------------------------------------------------------------------
# German and English.


def test_german():
    text = "Größe Straße ÄÖÜ: „Anführungszeichen“ – Gedankenstrich"
    assert normalize(text, "de") == "größe straße äöü anführungszeichen gedankenstrich"
    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text and normalize(decomposed, "de") == normalize(text, "de")
    assert normalize("Stra\u00adße", "de") == "straße"  # soft hyphen (Cf) removed, not a space


def test_english():
    assert normalize("Don't stop [noise] the (laughs) 3rd-rate SHOW!", "en") == "dont stop the 3rd rate show"
    assert normalize("  Extra   spaces\tand\nnewlines  ") == "extra spaces and newlines"
    assert normalize("<unk> Hello, World!") == "hello world"
    assert normalize("emoji 🙂 and math ∑ ± ×") == "emoji and math"
    assert normalize("a\u200bb") == "ab"  # zero-width space (Cf)
    assert normalize("") == normalize("   ") == ""


@pytest.mark.parametrize("text, language", [
    ("İstanbul'da IŞIK ılık, Çağrı!", "tr"), ("ދިވެހިރާއްޖެ.", "dv"), ("नमस्ते दुनिया।", "hi"),
    ("Größe Straße", "de"), ("Don't (aside) stop", "en"), ("Numbers 1,000.5 and ١٢٣ ४५", ""),
])
def test_idempotent(text, language):
    once = normalize(text, language)
    assert normalize(once, language) == once
    assert once == once.strip() and "  " not in once
