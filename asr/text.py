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


def clean_transcript(text: str, cfg, language: str = "") -> str:
    """Training-side cleaning from `data.text` (a TextConfig): replacements, case, removed characters.

    With `lowercase`, the replacement table is applied again after lower-casing, so {"â" = "a"} also
    covers "Â" (and a table entry for an upper-case letter still sees it before lower-casing)."""
    text = unicodedata.normalize("NFC", text)
    text = _replace(text, cfg.replace)
    if cfg.lowercase:
        text = _replace(lower(text, language), cfg.replace)
    if cfg.chars_to_ignore:
        text = re.sub(_ignore_pattern(cfg.chars_to_ignore), "", text)
    if cfg.collapse_whitespace:
        text = " ".join(text.split())
    return text


def _replace(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if old:
            text = text.replace(old, new)
    return text


def _ignore_pattern(chars: str) -> str:
    # A bare list of characters (",?.!") becomes a character class; a regex is used as given.
    if chars.startswith("[") or "\\" in chars or "|" in chars:
        return chars
    return "[" + re.escape(chars) + "]"


# ---------------------------------------------------------------------------------------
# Evaluation normalisers.


def basic_normalize(text: str) -> str:
    """Whisper's BasicTextNormalizer (remove_diacritics=False): lower-case, drop bracketed spans,
    replace marks, symbols and punctuation with spaces, collapse whitespace."""
    s = text.lower()
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)
    s = re.sub(r"\(([^)]+?)\)", "", s)
    s = "".join(" " if unicodedata.category(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKC", s))
    s = s.lower()
    return re.sub(r"\s+", " ", s)


NORMALIZERS = {
    "basic": basic_normalize,
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


def load_vocab(folder: str | Path):
    """The CTC vocabulary saved in `folder` (sentencepiece if a model file is there, else characters)."""
    if Path(folder, "sentencepiece.model").is_file():
        return PieceVocab.load(folder)
    return CharVocab.load(folder)
