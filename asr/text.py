"""Transcript cleaning, evaluation normalisers and CTC vocabularies (characters or sentencepiece units)."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

PAD, UNK, WORD_DELIMITER = "[PAD]", "[UNK]", "|"

# ---------------------------------------------------------------------------------------
# Case and cleaning.

_DOTTED_LOCALES = {"tr", "az", "crh", "gag", "tt", "ba", "kk"}  # languages with dotted/dotless i


def lower(text: str, language: str = "") -> str:
    """Lower-case, right for Turkic languages (I->ı, İ->i) when `language` is one of them."""
    if language.replace("_", "-").split("-")[0].lower() in _DOTTED_LOCALES:
        text = text.replace("I", "ı").replace("İ", "i")
    return text.lower()


def strip_controls(text: str) -> tuple[str, str]:
    """(`text` without control characters, the distinct characters taken out, in order of appearance).

    Control characters (Unicode Cc: C0, DEL, C1) and lone surrogates (Cs, which a JSON string can hold
    as "\\ud800" and UTF-8 cannot write) are removed; tab, newline and carriage return, which a JSON
    string or a quoted CSV cell can hold between words, become spaces (and are reported too)."""
    if text.isprintable():  # no Cc/Cs (nor other invisibles): the common case
        return text, ""
    out, removed = [], {}
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cs"):
            removed[c] = None
            if c in "\t\n\r":
                out.append(" ")
            continue
        out.append(c)
    return "".join(out), "".join(removed)


def clean_transcript(text: str, cfg, language: str = "") -> str:
    """Training-side cleaning from `data.text` (a TextConfig): control characters (`strip_controls`),
    replacements, case, removed characters.

    With `lowercase`, the replacement table is applied again after lower-casing, so {"â" = "a"} also
    covers "Â" (and a table entry for an upper-case letter still sees it before lower-casing)."""
    text = unicodedata.normalize("NFC", strip_controls(text)[0])
    text = _replace(text, cfg.replace)
    if cfg.lowercase:
        text = _replace(lower(text, language), cfg.replace)
    if cfg.chars_to_ignore:
        text = re.sub(ignore_pattern(cfg.chars_to_ignore), "", text)
    if cfg.collapse_whitespace:
        text = " ".join(text.split())
    return text


def _replace(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if old:
            text = text.replace(old, new)
    return text


def ignore_pattern(chars: str) -> str:
    """The regular expression of data.text.chars_to_ignore: a bare list of characters (",?.!") becomes a
    character class; a regex is used as given."""
    if chars.startswith("[") or "\\" in chars or "|" in chars:
        return chars
    return "[" + re.escape(chars) + "]"


def extend_chars_to_ignore(current: str, chars: str) -> str:
    """A `data.text.chars_to_ignore` value that removes what `current` removes and every character of `chars`:
    a bare list stays one where it can, a single character class gets them added, another regex becomes
    `(?:current)|[chars]`."""
    new = "".join(dict.fromkeys(chars))
    if not new:
        return current
    if not current or ignore_pattern(current) != current:  # empty or a bare list of characters
        merged = "".join(dict.fromkeys(current + new))
        return merged if ignore_pattern(merged) != merged else "[" + re.escape(merged) + "]"
    m = re.fullmatch(r"\[((?:\\.|[^\\\]])+)\]", current)
    if m and not m.group(1).startswith("^"):
        return "[" + m.group(1) + re.escape(new) + "]"
    return f"(?:{current})|[{re.escape(new)}]"


# ---------------------------------------------------------------------------------------
# Evaluation normalisers.


def basic_normalize(text: str, language: str = "") -> str:
    """Whisper's BasicTextNormalizer (remove_diacritics=False): lower-case, drop bracketed spans,
    replace marks, symbols and punctuation with spaces, collapse whitespace. `language` is ignored
    (accepted so that every normaliser in NORMALIZERS takes the same arguments).

    Kept for comparison with published numbers only: it replaces every combining mark with a space, so
    it deletes the vowel signs of Thaana, Devanagari and the other Brahmic scripts (two different words
    become the same letters), splits words at them, and turns "İstanbul" into "i stanbul"."""
    s = text.lower()
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)
    s = re.sub(r"\(([^)]+?)\)", "", s)
    s = "".join(" " if unicodedata.category(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKC", s))
    s = s.lower()
    return re.sub(r"\s+", " ", s)


# Apostrophe-like characters. Between two word characters (letters, marks, digits) one is removed
# without splitting the word ("Türkiye'nin" -> "türkiyenin", "don't" -> "dont"): the same word
# written with or without its apostrophe, or with another apostrophe character, scores as equal.
# Anywhere else (quotes) it is punctuation and becomes a space.
APOSTROPHES = "'\u2019\u02bc\u2018`\u00b4\u2032"
_DROPPED = {"\u0640"}  # Arabic tatweel: typographic stretching only


def _is_word_char(c: str) -> bool:
    return unicodedata.category(c)[0] in "LMN"


def normalize(text: str, language: str = "") -> str:
    """Script-aware evaluation normaliser (eval.normalizer = "script").

    - NFC (canonical composition; no compatibility folding, nothing stripped);
    - lower-case, language-aware (`asr.text.lower`: Turkish/Azeri I -> ı, İ -> i); for other languages
      "İ" also becomes "i" (Python's str.lower gives "i" + U+0307 COMBINING DOT ABOVE);
    - spans in [...], <...> and (...) are removed, as Whisper's BasicTextNormalizer does;
    - an apostrophe between two word characters is removed without splitting the word (see APOSTROPHES);
    - letters (L*), digits and numbers (N*) and every combining mark (Mn, Mc, Me: Thaana fili, Brahmic
      vowel signs and viramas, Thai/Lao vowels and tone marks, Hebrew points, Arabic harakat) are kept,
      attached to their base letters;
    - invisible format characters (Cf: zero-width joiner/non-joiner, soft hyphen, bidi marks, BOM) and
      the Arabic tatweel are removed; punctuation, symbols, separators and control characters become
      spaces; whitespace is collapsed and the ends stripped.

    `language` is optional, so the one-argument call `NORMALIZERS[name](text)` works; pass the
    utterance's language for Turkic dotted/dotless i.
    """
    s = unicodedata.normalize("NFC", text)
    s = lower(s.replace("\u0130", "i"), language)  # İ -> i also outside the Turkic languages
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)
    s = re.sub(r"\(([^)]+?)\)", "", s)
    out = []
    n = len(s)
    for i, c in enumerate(s):
        if c in APOSTROPHES:
            if 0 < i < n - 1 and _is_word_char(s[i - 1]) and _is_word_char(s[i + 1]):
                continue
            out.append(" ")
            continue
        if c in _DROPPED:
            continue
        cat = unicodedata.category(c)
        if cat[0] in "LMN" or cat in ("Co", "Cn"):  # private-use and unassigned: unknown, so kept
            out.append(c)
        elif cat == "Cf":
            continue
        else:  # P*, S*, Z*, Cc (tabs, newlines), Cs
            out.append(" ")
    s = unicodedata.normalize("NFC", "".join(out))
    return " ".join(s.split())


NORMALIZERS = {
    "script": normalize,  # the default: keeps the combining marks that carry meaning
    "basic": basic_normalize,  # Whisper's BasicTextNormalizer, for comparison with published numbers
}


# ---------------------------------------------------------------------------------------
# CTC vocabularies. Id 0 is the CTC blank ([PAD]), id 1 is [UNK].


class CharVocab:
    """Characters of the training transcripts; spaces become the word delimiter `|`."""

    kind = "char"

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.blank = self.index[PAD]
        self.unk = self.index[UNK]

    @classmethod
    def build(cls, texts) -> "CharVocab":
        chars = sorted({c for t in texts for c in t} - {" "})
        return cls([PAD, UNK, WORD_DELIMITER] + [c for c in chars if c != WORD_DELIMITER])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(WORD_DELIMITER if c == " " else c, self.unk) for c in text]

    def decode(self, ids) -> str:
        text = "".join(" " if self.tokens[i] == WORD_DELIMITER else self.tokens[i] for i in ids if i != self.blank)
        return " ".join(text.split())

    def save(self, folder: str | Path) -> None:
        Path(folder, "vocab.json").write_text(json.dumps(self.index, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "CharVocab":
        index = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        return cls([t for t, _ in sorted(index.items(), key=lambda kv: kv[1])])


class PieceVocab:
    """Sentencepiece units (unigram or BPE) trained on the training transcripts."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.tokens = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.blank, self.unk = self.sp.pad_id(), self.sp.unk_id()

    @classmethod
    def build(cls, texts, vocab_size: int = 128, model_type: str = "unigram") -> "PieceVocab":
        import io

        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        # Cap the size at what the data supports, so tiny corpora still train.
        n_chars = len({c for t in texts for c in t})
        buf = io.BytesIO()
        kwargs = dict(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
            hard_vocab_limit=False, minloglevel=2, num_threads=1,
        )
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError:
            if vocab_size <= n_chars + 3:
                raise
            kwargs.update(sentence_iterator=iter(texts), vocab_size=n_chars + 3)
            buf.seek(0), buf.truncate()
            spm.SentencePieceTrainer.train(**kwargs)
        return cls(buf.getvalue())

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return " ".join("".join(self.tokens[i] for i in ids if i != self.blank).replace("▁", " ").split())

    def save(self, folder: str | Path) -> None:
        Path(folder, "sentencepiece.model").write_bytes(self.proto)
        Path(folder, "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(self.tokens)}, ensure_ascii=False, indent=1), encoding="utf-8"
        )

    @classmethod
    def load(cls, folder: str | Path) -> "PieceVocab":
        return cls(Path(folder, "sentencepiece.model").read_bytes())


def run_vocab(data_cfg, texts: list[str], folder: str | Path):
    """The CTC vocabulary of a run and where it came from: the one saved in `folder` ("saved"), else one
    built from the cleaned training `texts` as data.vocab says ("built"), else (None, "none")."""
    if Path(folder, "vocab.json").is_file():
        return load_vocab(folder), "saved"
    if not texts:
        return None, "none"
    if data_cfg.vocab == "sentencepiece":
        return PieceVocab.build(texts, data_cfg.sp_vocab_size, data_cfg.sp_model_type), "built"
    return CharVocab.build(texts), "built"


def load_vocab(folder: str | Path):
    """The CTC vocabulary saved in `folder` (sentencepiece if a model file is there, else characters)."""
    if Path(folder, "sentencepiece.model").is_file():
        return PieceVocab.load(folder)
    return CharVocab.load(folder)
