"""asr.decode: best-path CTC decoding by hand and against Wav2Vec2CTCTokenizer; Whisper generation."""

from __future__ import annotations

import pytest
import torch

from asr.decode import ctc_greedy
from asr.text import CharVocab


def path_log_probs(paths: list[list[int]], vocab_size: int) -> torch.Tensor:
    """(B, T, V) log-probs whose per-frame argmax is the given path (shorter paths padded with id 0)."""
    T = max(len(p) for p in paths)
    logits = torch.full((len(paths), T, vocab_size), -5.0)
    for b, p in enumerate(paths):
        for t, i in enumerate(p):
            logits[b, t, i] = 5.0
    return logits.log_softmax(-1)


def test_ctc_greedy_by_hand():
    # blank = 0: repeats collapse, a blank separates a genuine repeat, leading/trailing blanks vanish.
    paths = [[0, 1, 1, 0, 1, 2, 2, 2, 0, 0, 3, 0],
             [2, 2, 2, 2],
             [0, 0, 0],
             [3, 0, 3, 3, 1, 0]]
    lp = path_log_probs(paths, 4)
    lengths = torch.tensor([12, 4, 3, 6])
    assert ctc_greedy(lp, lengths, blank=0) == [[1, 1, 2, 3], [2], [], [3, 3, 1]]


def test_ctc_greedy_respects_lengths():
    paths = [[1, 2, 0, 3, 3, 1, 2], [1, 2, 0, 3, 3, 1, 2]]
    lp = path_log_probs(paths, 4)
    # Frames past an item's length are padding and must not be decoded.
    assert ctc_greedy(lp, torch.tensor([7, 4]), blank=0) == [[1, 2, 3, 1, 2], [1, 2, 3]]
    assert ctc_greedy(lp, torch.tensor([0, 1]), blank=0) == [[], [1]]


def test_ctc_greedy_blank_not_zero():
    # The blank is id 3 here; id 0 is an ordinary label.
    paths = [[0, 0, 3, 0, 1, 3, 3, 1, 2, 2]]
    lp = path_log_probs(paths, 4)
    assert ctc_greedy(lp, torch.tensor([10]), blank=3) == [[0, 0, 1, 1, 2]]
    assert ctc_greedy(lp, torch.tensor([10]), blank=0) == [[3, 1, 3, 1, 2]]


def test_ctc_greedy_accepts_logits_and_tensor_or_list_lengths():
    paths = [[1, 1, 0, 2]]
    lp = path_log_probs(paths, 3)
    assert ctc_greedy(lp * 3.0 + 1.0, [4], blank=0) == ctc_greedy(lp, torch.tensor([4]), blank=0) == [[1, 2]]


@pytest.mark.parametrize("texts,seed", [
    (["ab ba", "a b"], 0),  # tiny vocabulary: many repeats, blanks and word delimiters
    (["merhaba dünya", "bir iki üç dört beş", "ışık ılık çiğ ördek"], 1),
])
def test_ctc_greedy_matches_wav2vec2_tokenizer(tmp_path, texts, seed):
    from transformers import Wav2Vec2CTCTokenizer

    vocab = CharVocab.build(texts)
    vocab.save(tmp_path)
    tok = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                               word_delimiter_token="|", bos_token=None, eos_token=None)
    assert tok.pad_token_id == vocab.blank

    g = torch.Generator().manual_seed(seed)
    B, T, V = 8, 60, len(vocab)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    logits[..., vocab.blank] += 1.0  # blanks common, as in a real CTC model
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    ours = ctc_greedy(logits.log_softmax(-1), lengths, vocab.blank)

    argmax = logits.argmax(-1)
    theirs = tok.batch_decode([argmax[b, : lengths[b]].tolist() for b in range(B)])
    for b in range(B):
        # Same collapse and blank removal: our ids, written out by the tokenizer without grouping, give its text.
        assert tok.decode(ours[b], group_tokens=False) == theirs[b]
        # Our ids -> text (asr.text) differs only in collapsing runs of word delimiters to one space.
        assert vocab.decode(ours[b]) == " ".join(theirs[b].split())
    assert any(len(ids) > 3 for ids in ours)
    assert any("|" in [vocab.tokens[i] for i in ids] for ids in ours)  # delimiters were exercised
