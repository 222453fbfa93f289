"""asr.decode.ctc_beam_search: prefix beam search against greedy, brute force and torch's CTC loss;
shallow fusion with a word n-gram LM and hotword boosting, on character and sentencepiece vocabularies."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from asr.decode import _Words, ctc_beam_search, ctc_beam_search_nbest, ctc_greedy
from asr.lm import NgramLM, build_arpa
from asr.text import CharVocab, PieceVocab

LN10 = math.log(10)


def random_log_probs(seed: int, B: int = 5, T: int = 40, V: int = 7, sharp: float = 2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * sharp).log_softmax(-1).to(dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    return log_probs, lengths


def ctc_log_prob(log_probs: torch.Tensor, ids: list[int], blank: int) -> float:
    """log p(ids | x) summed over all alignments, by torch's CTC loss. log_probs (T, V)."""
    T = log_probs.shape[0]
    loss = torch.nn.functional.ctc_loss(log_probs.double(), torch.tensor(ids, dtype=torch.long),
                                        torch.tensor([T]), torch.tensor([len(ids)]), blank=blank, reduction="sum")
    return -loss.item()


def brute_force_best(log_probs: torch.Tensor, blank: int) -> tuple[list[int], dict[tuple, float]]:
    """The labelling with the highest summed probability, by enumerating every alignment. (T, V)"""
    probs = log_probs.double().exp()
    T, V = probs.shape
    total: dict[tuple, float] = {}
    for path in itertools.product(range(V), repeat=T):
        ids, prev = [], None
        for t in path:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        p = math.prod(probs[t, k].item() for t, k in enumerate(path))
        total[tuple(ids)] = total.get(tuple(ids), 0.0) + p
    return list(max(total, key=total.get)), total


# ---------------------------------------------------------------------------------------
# Without a language model.


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("blank", [0, 4])
@pytest.mark.parametrize("sharp", [1.0, 4.0])  # flat and peaky outputs (peaky ones repeat labels)
def test_width_one_equals_greedy(seed, blank, sharp):
    log_probs, lengths = random_log_probs(seed, sharp=sharp)
    assert ctc_beam_search(log_probs, lengths, blank, beam_width=1) == ctc_greedy(log_probs, lengths, blank)
    assert ctc_beam_search(log_probs, lengths, blank, beam_width=1, token_top_k=0) == \
        ctc_greedy(log_probs, lengths, blank)
    assert ctc_beam_search(log_probs, lengths, blank, beam_width=1, token_min_logp=0.0) == \
        ctc_greedy(log_probs, lengths, blank)


def test_width_one_breaks_ties_like_argmax():
    # Exact ties in a frame go to the lower id, as torch's argmax does.
    rows = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1], [0.4, 0.1, 0.1, 0.4], [0.3, 0.3, 0.1, 0.3],
            [0.2, 0.1, 0.35, 0.35], [0.2, 0.1, 0.35, 0.35]]
    log_probs = _probs(rows)
    lengths = torch.tensor([len(rows)])
    greedy = ctc_greedy(log_probs, lengths, 0)
    assert greedy == [[1, 2]]
    assert ctc_beam_search(log_probs, lengths, 0, beam_width=1) == greedy
    for blank in (0, 3):
        for kwargs in ({}, {"token_top_k": 1}, {"token_min_logp": 0.0}):
            assert ctc_beam_search(log_probs, lengths, blank, beam_width=1, **kwargs) == \
                ctc_greedy(log_probs, lengths, blank)


def test_zero_length_items_decode_to_nothing():
    log_probs, _ = random_log_probs(0, B=2)
    assert ctc_beam_search(log_probs, torch.tensor([0, 0]), 0) == [[], []]


def _probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float64).log()  # (1, T, V)


@pytest.mark.parametrize("rows, greedy, best", [
    # blank 0.6 twice: the best path is blank-blank (""), but "a" sums aa + a_ + _a = 0.64 > 0.36.
    ([[0.6, 0.4], [0.6, 0.4]], [], [1]),
    # The best path is b then blank ("b": 0.3305 over its alignments), but "a" collects 0.345.
    ([[0.25, 0.35, 0.40], [0.42, 0.33, 0.25]], [2], [1]),
])
def test_summed_alignments_beat_the_best_path(rows, greedy, best):
    log_probs = _probs(rows)
    lengths = torch.tensor([len(rows)])
    assert ctc_greedy(log_probs, lengths, 0) == [greedy]
    assert ctc_beam_search(log_probs, lengths, 0, beam_width=4) == [best]
    assert brute_force_best(log_probs[0], 0)[0] == best


@pytest.mark.parametrize("seed", range(4))
def test_wide_beam_is_exact(seed):
    # With no pruning, the beam holds every labelling with its exact CTC probability.
    log_probs, _ = random_log_probs(seed, B=1, T=6, V=3, sharp=1.0, dtype=torch.float64)
    lengths = torch.tensor([6])
    best, total = brute_force_best(log_probs[0], blank=0)
    hyps = ctc_beam_search_nbest(log_probs, lengths, 0, beam_width=10_000, token_top_k=0)[0]
    assert hyps[0][0] == best == ctc_beam_search(log_probs, lengths, 0, beam_width=10_000, token_top_k=0)[0]
    assert {tuple(ids) for ids, _ in hyps} == set(total)
    for ids, score in hyps:
        assert score == pytest.approx(math.log(total[tuple(ids)]), abs=1e-9)
        assert score == pytest.approx(ctc_log_prob(log_probs[0], ids, 0), abs=1e-9)
    assert sum(math.exp(s) for _, s in hyps) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pruned_beams_score_their_surviving_alignments(seed):
    # With pruning, a labelling's score sums the alignments that survived: never above its exact probability.
    log_probs, lengths = random_log_probs(seed, B=3, T=30, V=6, sharp=3.0)
    log_probs = log_probs.double()
    for b, hyps in enumerate(ctc_beam_search_nbest(log_probs, lengths, 0, beam_width=8)):
        lp = log_probs[b, : int(lengths[b])]
        assert len(hyps) == 8 or int(lengths[b]) < 3
        for ids, score in hyps:
            assert score <= ctc_log_prob(lp, ids, 0) + 1e-9


def test_length_norm_divides_final_scores():
    log_probs, lengths = random_log_probs(1, B=2, T=20, V=5)
    plain = ctc_beam_search_nbest(log_probs, lengths, 0, beam_width=6)
    normed = ctc_beam_search_nbest(log_probs, lengths, 0, beam_width=6, length_norm=True)
    for p_hyps, n_hyps in zip(plain, normed):
        expected = {tuple(ids): s / max(1, len(ids)) for ids, s in p_hyps}
        assert {tuple(ids): s for ids, s in n_hyps} == pytest.approx(expected)
        assert [s for _, s in n_hyps] == sorted((s for _, s in n_hyps), reverse=True)


def test_lm_or_hotwords_need_a_vocabulary(tmp_path):
    log_probs, lengths = random_log_probs(0)
    with pytest.raises(ValueError, match="vocabulary"):
        ctc_beam_search(log_probs, lengths, 0, hotwords=["a"])


# ---------------------------------------------------------------------------------------
# Ambiguous acoustics: two label sequences of equal length that differ at some positions.


def ambiguous_log_probs(V: int, blank: int, preferred: list[int], other: list[int], p_pref: float = 0.5,
                        p_other: float = 0.4) -> torch.Tensor:
    """(1, T, V): one frame per label then one blank frame. Where the sequences differ, the frame gives
    `preferred` p_pref and `other` p_other; elsewhere the label gets 0.9. The rest is spread evenly."""
    assert len(preferred) == len(other)
    rows = []
    for a, b in zip(preferred, other):
        row = torch.zeros(V, dtype=torch.float64)
        if a == b:
            row[a] = 0.9
        else:
            row[a], row[b] = p_pref, p_other
        rest = 1.0 - row.sum()
        row[row == 0] = rest / (V - int((row > 0).sum()))
        rows.append(row)
        blank_row = torch.full((V,), 0.1 / (V - 1), dtype=torch.float64)
        blank_row[blank] = 0.9
        rows.append(blank_row)
    return torch.stack(rows).log().unsqueeze(0)


LM_TEXTS = ["bir kedi geldi", "bir kedi gitti", "kedi uyudu", "iki kedi geldi", "bir kedi", "yine yok", "bu kedi"]


@pytest.fixture(scope="module")
def char_vocab() -> CharVocab:
    return CharVocab.build(LM_TEXTS)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> NgramLM:
    return NgramLM.load(build_arpa(LM_TEXTS, 3, tmp_path_factory.mktemp("lm") / "lm.arpa"))


def decode_text(v, log_probs, **kwargs) -> str:
    """Beam search one utterance and spell it with vocabulary `v`."""
    ids = ctc_beam_search(log_probs, torch.tensor([log_probs.shape[1]]), v.blank, **kwargs)[0]
    return v.decode(ids)


def test_lm_prefers_the_word_it_knows(char_vocab, lm):
    heard, meant = char_vocab.encode("bir kedy geldi"), char_vocab.encode("bir kedi geldi")
    log_probs = ambiguous_log_probs(len(char_vocab), char_vocab.blank, heard, meant)
    assert char_vocab.decode(ctc_greedy(log_probs, torch.tensor([log_probs.shape[1]]), 0)[0]) == "bir kedy geldi"
    assert decode_text(char_vocab, log_probs) == "bir kedy geldi"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, lm=lm, alpha=0.0) == "bir kedy geldi"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, lm=lm, alpha=0.5) == "bir kedi geldi"


def test_lm_direction_follows_the_lm(char_vocab, tmp_path):
    # Same acoustics (preferring "kedy"); an LM trained on text with "kedi" picks "kedi", one trained on
    # "kedy" keeps "kedy"; and with acoustics preferring "kedi", the "kedy" LM turns it to "kedy".
    kedy_lm = NgramLM.load(build_arpa([t.replace("kedi", "kedy") for t in LM_TEXTS], 3, tmp_path / "y.arpa"))
    kedi_lm = NgramLM.load(build_arpa(LM_TEXTS, 3, tmp_path / "i.arpa"))
    y, i = char_vocab.encode("bir kedy"), char_vocab.encode("bir kedi")
    prefers_y = ambiguous_log_probs(len(char_vocab), 0, y, i)
    prefers_i = ambiguous_log_probs(len(char_vocab), 0, i, y)
    assert decode_text(char_vocab, prefers_y, vocab=char_vocab, lm=kedi_lm) == "bir kedi"
    assert decode_text(char_vocab, prefers_y, vocab=char_vocab, lm=kedy_lm) == "bir kedy"
    assert decode_text(char_vocab, prefers_i, vocab=char_vocab, lm=kedy_lm) == "bir kedy"
    assert decode_text(char_vocab, prefers_i, vocab=char_vocab, lm=kedi_lm) == "bir kedi"


def test_lm_context_picks_between_known_words(tmp_path):
    # Both "kal" and "kol" are known words; the previous word decides.
    texts = ["sol kol"] * 3 + ["burada kal"] * 3 + ["kol", "kal"]
    vocab = CharVocab.build(texts)
    lm = NgramLM.load(build_arpa(texts, 2, tmp_path / "lm.arpa"))
    for first, want, other in [("sol", "kol", "kal"), ("burada", "kal", "kol")]:
        log_probs = ambiguous_log_probs(len(vocab), 0, vocab.encode(f"{first} {other}"),
                                        vocab.encode(f"{first} {want}"))
        assert decode_text(vocab, log_probs) == f"{first} {other}"
        assert decode_text(vocab, log_probs, vocab=vocab, lm=lm) == f"{first} {want}"


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (0.8, -0.5)])
def test_fused_score_is_acoustic_plus_lm_plus_word_bonus(char_vocab, lm, alpha, beta):
    text = "bir kedi geldi"
    ids = char_vocab.encode(text)
    log_probs = ambiguous_log_probs(len(char_vocab), 0, char_vocab.encode("bir kedy geldi"), ids)
    # A wide beam, so that almost no alignment of the labelling is pruned (those left out weigh < 1e-4).
    hyps = ctc_beam_search_nbest(log_probs, torch.tensor([log_probs.shape[1]]), 0, beam_width=256,
                                 vocab=char_vocab, lm=lm, alpha=alpha, beta=beta)[0]
    score = dict((tuple(i), s) for i, s in hyps)[tuple(ids)]
    expected = ctc_log_prob(log_probs[0], ids, 0) + alpha * LN10 * lm.score_sentence(text) + beta * 3
    assert score == pytest.approx(expected, abs=1e-4)


def test_hotwords_boost_towards_the_hotword(char_vocab):
    log_probs = ambiguous_log_probs(len(char_vocab), 0, char_vocab.encode("bir kedy"), char_vocab.encode("bir kedi"))
    assert decode_text(char_vocab, log_probs, vocab=char_vocab) == "bir kedy"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, hotwords=["kedi"]) == "bir kedi"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, hotwords=["bir kedi"]) == "bir kedi"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, hotwords=["kedi"], hotword_weight=0.0) == "bir kedy"
    # A hotword that "kedi" only starts: its partial bonus is taken back when the word ends as "kedi".
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, hotwords=["kedim"]) == "bir kedy"
    kedim = ctc_beam_search_nbest(log_probs, torch.tensor([log_probs.shape[1]]), 0, beam_width=256,
                                  vocab=char_vocab, hotwords=["kedim"])[0]
    for ids, score in kedim[:2]:  # no bonus is left in the final scores of "bir kedi" and "bir kedy"
        assert char_vocab.decode(ids) in ("bir kedi", "bir kedy")
        assert score == pytest.approx(ctc_log_prob(log_probs[0], ids, 0), abs=1e-4)


def test_hotword_beats_the_lm_when_heavy_enough(char_vocab, tmp_path):
    kedy_lm = NgramLM.load(build_arpa([t.replace("kedi", "kedy") for t in LM_TEXTS], 3, tmp_path / "y.arpa"))
    log_probs = ambiguous_log_probs(len(char_vocab), 0, char_vocab.encode("bir kedy"), char_vocab.encode("bir kedi"))
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, lm=kedy_lm) == "bir kedy"
    assert decode_text(char_vocab, log_probs, vocab=char_vocab, lm=kedy_lm, hotwords=["kedi"],
                       hotword_weight=3.0) == "bir kedi"


# ---------------------------------------------------------------------------------------
# Sentencepiece vocabularies: "▁" starts a word.


@pytest.fixture(scope="module")
def piece_vocab() -> PieceVocab:
    import sentencepiece as spm

    texts = LM_TEXTS * 3
    buf = io.BytesIO()
    # "▁kedi" and "▁kedy" as whole pieces, so the two spellings are one token each.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=30, model_type="unigram",
        character_coverage=1.0, pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, user_defined_symbols=["▁kedi", "▁kedy"])
    return PieceVocab(buf.getvalue())


def test_piece_vocab_words(piece_vocab):
    ids = piece_vocab.encode("bir kedi geldi yine")
    assert len(ids) > 4  # several words span several pieces
    words = _Words(piece_vocab, None, 0.0, 0.0, (), 0.0)
    assert words.words(ids) == ["bir", "kedi", "geldi", "yine"]


def test_piece_vocab_lm_fusion(piece_vocab, lm):
    heard, meant = piece_vocab.encode("bir kedy geldi"), piece_vocab.encode("bir kedi geldi")
    assert len(heard) == len(meant) and sum(a != b for a, b in zip(heard, meant)) == 1
    log_probs = ambiguous_log_probs(len(piece_vocab), piece_vocab.blank, heard, meant)
    assert decode_text(piece_vocab, log_probs) == "bir kedy geldi"
    assert decode_text(piece_vocab, log_probs, vocab=piece_vocab, lm=lm, alpha=0.0) == "bir kedy geldi"
    assert decode_text(piece_vocab, log_probs, vocab=piece_vocab, lm=lm) == "bir kedi geldi"
    assert decode_text(piece_vocab, log_probs, vocab=piece_vocab, hotwords=["kedi"]) == "bir kedi geldi"
    hyps = ctc_beam_search_nbest(log_probs, torch.tensor([log_probs.shape[1]]), piece_vocab.blank, beam_width=256,
                                 vocab=piece_vocab, lm=lm, alpha=0.5, beta=1.0)[0]
    score = dict((tuple(i), s) for i, s in hyps)[tuple(meant)]
    expected = ctc_log_prob(log_probs[0], meant, 0) + 0.5 * LN10 * lm.score_sentence("bir kedi geldi") + 1.0 * 3
    assert score == pytest.approx(expected, abs=1e-4)


def test_blank_not_at_zero_with_lm(char_vocab, lm):
    # Move the blank to the last id: the search must not treat id 0 specially.
    heard, meant = char_vocab.encode("bir kedy"), char_vocab.encode("bir kedi")
    log_probs = ambiguous_log_probs(len(char_vocab), 0, heard, meant)
    perm = list(range(1, len(char_vocab))) + [0]  # new id j holds old id perm[j]
    moved = log_probs[..., perm]
    old_of_new = {j: perm[j] for j in range(len(perm))}
    new_of_old = {v: k for k, v in old_of_new.items()}

    class Moved:  # the same vocabulary with ids rotated
        kind = "char"
        tokens = [char_vocab.tokens[perm[j]] for j in range(len(perm))]

    blank = new_of_old[0]
    lengths = torch.tensor([moved.shape[1]])
    plain = ctc_beam_search(moved, lengths, blank)[0]
    fused = ctc_beam_search(moved, lengths, blank, vocab=Moved, lm=lm)[0]
    assert char_vocab.decode([old_of_new[i] for i in plain]) == "bir kedy"
    assert char_vocab.decode([old_of_new[i] for i in fused]) == "bir kedi"
