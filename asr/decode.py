"""Decoders: pure functions from model outputs to token ids, and ids to text."""

from __future__ import annotations

import copy
import functools
import heapq
import math

import torch


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

    log_probs (B, T, V) (or logits: the argmax is the same), lengths (B,) valid frames per item.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (B, T)
    out = []
    for b in range(best.shape[0]):
        path = best[b, : int(lengths[b])].tolist()
        ids, prev = [], None
        for t in path:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


def whisper_generation_config(model, method: str = "greedy", beam_size: int = 4, max_new_tokens: int = 225,
                              args: dict | None = None):
    """The model's generation config for decoding from an explicit prompt: its token suppression rules,
    the search settings of decoder `method` (DECODERS["whisper"]) and the token limit, no language/task of
    its own (the prompt holds them)."""
    gen = copy.deepcopy(model.generation_config)
    gen.forced_decoder_ids = None
    gen.language = None
    gen.task = None
    gen.max_length = None  # the limit is max_new_tokens
    gen.max_new_tokens = max_new_tokens
    gen.num_beams = 1
    gen.do_sample = False
    gen.return_timestamps = False
    for key, value in DECODERS["whisper"][method](beam_size, **(args or {})).items():
        setattr(gen, key, value)
    return gen


def whisper_context(tokenizer, text: str, max_tokens: int = 223) -> list[int]:
    """<|startofprev|> followed by `text` as previous context (its last `max_tokens` tokens), as Whisper
    conditions on earlier text; [] for no text."""
    if not text.strip():
        return []
    ids = tokenizer.encode(" " + text.strip(), add_special_tokens=False)[-max_tokens:]
    return [tokenizer.convert_tokens_to_ids("<|startofprev|>")] + ids


@torch.no_grad()
def whisper_generate(bundle, batch: dict, device: torch.device, method: str = "greedy", beam_size: int = 4,
                     max_new_tokens: int = 225, prompt: str = "", encoder_outputs=None,
                     args: dict | None = None) -> list[str]:
    """Batched Whisper decoding through `generate`, started from each utterance's training prompt
    (<|startoftranscript|> [<|lang|>] <|task|> <|notimestamps|>), so decoding is forced to the same
    language (or none, where model.language_map leaves it out) and task as the labels. `prompt` is
    optional previous-context text (domain vocabulary, spellings) placed before it.

    Utterances whose prompts differ (several languages in one batch) are decoded in groups. Given the
    batch's `encoder_outputs` (computed already, e.g. for the evaluation loss), the encoder is not run again.
    """
    from transformers import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    from asr.models import model_inputs

    model = bundle.model
    if encoder_outputs is None:
        features = model_inputs(bundle, batch, device)["input_features"]  # (B, n_mels, 3000)
        encoder_outputs = model.get_encoder()(features)
    hidden = encoder_outputs.last_hidden_state  # (B, 1500, d)
    context = whisper_context(bundle.tokenizer, prompt)
    prompts = [tuple(context + bundle.prefix_tokens(lang)) for lang in batch["languages"]]
    texts: list[str] = [""] * len(prompts)
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        limit = min(max_new_tokens, model.config.max_target_positions - len(prompt))
        gen = whisper_generation_config(model, method, beam_size, limit, args)
        decoder_input_ids = torch.tensor([prompt] * len(rows), dtype=torch.long, device=device)  # (b, P)
        # The base class's generate: Whisper's own would pick the prompt from language/task arguments
        # and cannot leave the language token out. The encoder input has no padding (30 s features).
        ids = GenerationMixin.generate(
            model, encoder_outputs=BaseModelOutput(last_hidden_state=hidden[rows]),
            decoder_input_ids=decoder_input_ids, generation_config=gen)
        for i, text in zip(rows, bundle.tokenizer.batch_decode(ids[:, len(prompt):], skip_special_tokens=True)):
            texts[i] = text
    return texts


@functools.lru_cache(maxsize=2)
def load_lm(path: str):
    """A word n-gram LM from an ARPA file, read once per process."""
    from asr.lm import NgramLM

    return NgramLM.load(path)


@torch.no_grad()
def ctc_decode(bundle, outputs, batch: dict, cfg=None) -> list[str]:
    """CTC decoding of a forward pass to text with decoder `cfg.method` of DECODERS["ctc"] (greedy without
    `cfg`, a DecodeConfig), given `cfg.args` as keyword arguments."""
    from asr.models import ctc_output_lengths

    lengths = ctc_output_lengths(bundle.model, batch["audio_lengths"])  # (B,)
    log_probs = torch.log_softmax(outputs.logits.float(), dim=-1)  # (B, T, V)
    method, args = ("greedy", {}) if cfg is None else (cfg.method, cfg.args)
    ids = DECODERS["ctc"][method](log_probs, lengths, bundle.vocab, cfg, **args)
    return [bundle.vocab.decode(i) for i in ids]


# ---------------------------------------------------------------------------------------
# The decoders, by model family and name (decode.method), like asr.losses.LOSSES.
#
# CTC: (log_probs (B, T, V) float32 log-softmax, lengths (B,) valid frames, vocab, cfg: DecodeConfig,
#       **decode.args) -> label ids per item (the blank and repeats already removed).
# Whisper: (beam_size, **decode.args) -> generation settings for transformers' `generate` (num_beams,
#       do_sample, temperature, length_penalty, ...), which runs the search from each utterance's prompt.
# To add one: write the function, add it below, set decode.method (and decode.args) in the experiment file.


def ctc_best_path(log_probs: torch.Tensor, lengths: torch.Tensor, vocab, cfg=None) -> list[list[int]]:
    """Best path: `ctc_greedy`."""
    return ctc_greedy(log_probs, lengths, vocab.blank)


def ctc_prefix_beam(log_probs: torch.Tensor, lengths: torch.Tensor, vocab, cfg) -> list[list[int]]:
    """Prefix beam search (`ctc_beam_search`) with decode.beam_size, and decode.lm / hotwords if set."""
    return ctc_beam_search(log_probs, lengths, vocab.blank, beam_width=cfg.beam_size, vocab=vocab,
                           lm=load_lm(cfg.lm) if cfg.lm else None, alpha=cfg.lm_alpha, beta=cfg.lm_beta,
                           hotwords=tuple(cfg.hotwords), hotword_weight=cfg.hotword_weight,
                           length_norm=cfg.length_norm)


DECODERS = {
    "ctc": {"greedy": ctc_best_path, "beam": ctc_prefix_beam},
    "whisper": {"greedy": lambda beam_size: {"num_beams": 1},
                "beam": lambda beam_size: {"num_beams": beam_size}},
}


def decode_tag(cfg) -> str:
    """A short name for a decoding setting, used in eval file names: the method's registry name (beam search
    with its width), then what changes its output: beam8-lm, greedy-prompt, greedy_bp-blank_penalty2.0."""
    tag = f"beam{cfg.beam_size}" if cfg.method == "beam" else cfg.method
    if cfg.method == "beam" and cfg.lm:
        tag += "-lm"
    if cfg.method == "beam" and cfg.hotwords:
        tag += "-hot"
    if cfg.prompt:
        tag += "-prompt"
    for key, value in sorted(cfg.args.items()):
        tag += f"-{key}{value}"
    return tag


def check_decoder(cfg, family: str) -> str | None:
    """Why decode.method / decode.args do not fit a decoder of `family` ("ctc" or "whisper"), or None."""
    import inspect

    known = DECODERS[family]
    if cfg.method not in known:
        return f"decode.method: {cfg.method!r} is not a {family} decoder (known: {', '.join(known)})"
    params = inspect.signature(known[cfg.method]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        fixed = 4 if family == "ctc" else 1  # the arguments every decoder of the family is given
        accepted = [name for name in list(params)[fixed:]]
        unknown = sorted(set(cfg.args) - set(accepted))
        if unknown:
            return (f"decode.args: {cfg.method!r} takes no argument {unknown[0]!r} "
                    f"(it takes: {', '.join(accepted) or 'none'})")
    return None


# ---------------------------------------------------------------------------------------
# CTC prefix beam search, optionally fused with a word n-gram LM (asr.lm.NgramLM) and hotwords.
_NEG_INF = float("-inf")
_CONT, _START, _DELIM = 0, 1, 2  # a token continues the current word / starts a new one / ends it


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for python floats, exact when one side is -inf."""
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a >= b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def ctc_word_rules(vocab) -> list[tuple[int, str]]:
    """How each token id acts on words, as (role, text): role _CONT appends `text` to the current word,
    _START ends the current word and starts a new one with `text`, _DELIM ends the current word.

    Character vocabularies (`kind == "char"`, or any vocabulary holding "|") delimit words with "|";
    sentencepiece vocabularies start a word with each piece that begins with "▁". The blank and
    special tokens ([UNK]) continue the current word with their own text, which a LM reads as <unk>.
    """
    from asr.text import WORD_DELIMITER

    tokens = list(vocab.tokens)
    kind = getattr(vocab, "kind", "char" if WORD_DELIMITER in tokens else "sentencepiece")
    rules = []
    for tok in tokens:
        if kind == "char":
            rules.append((_DELIM, "") if tok == WORD_DELIMITER else (_CONT, tok))
        else:
            rules.append((_START, tok[1:]) if tok.startswith("▁") else (_CONT, tok))
    return rules


class _Words:
    """Word-level scoring of label prefixes for the beam search: LM shallow fusion and hotwords.

    A prefix's text state is (lm_state, current partial word, score of its completed words, hotword
    bonus of the partial word). The score of a completed word is alpha * ln p_LM(word | history) + beta
    (with a LM), plus hotword_weight * len(word) if it is a hotword. While the partial word is a
    prefix of a hotword it carries hotword_weight * len(partial); the bonus is dropped as soon as it
    stops being one, and is kept only if the word ends as a hotword (pyctcdecode's scheme, per character).
    """

    def __init__(self, vocab, lm, alpha: float, beta: float, hotwords, hotword_weight: float):
        self.rules = ctc_word_rules(vocab) if vocab is not None else None
        self.lm, self.alpha, self.beta = lm, alpha, beta
        if isinstance(hotwords, str):
            hotwords = [hotwords]
        words = [w for h in hotwords for w in h.split()]
        self.hotwords = set(words)
        self.hot_prefixes = {w[:i] for w in words for i in range(1, len(w) + 1)}
        self.hotword_weight = hotword_weight
        self.active = lm is not None or bool(self.hotwords)
        self.initial = (lm.start() if lm is not None else None, "", 0.0, 0.0)

    def _complete(self, state):
        lm_state, word, score, _ = state
        if word:
            if self.lm is not None:
                lm_state, lp = self.lm.advance(lm_state, word)
                score += self.alpha * lp + self.beta
            if word in self.hotwords:
                score += self.hotword_weight * len(word)
        return lm_state, score

    def _partial(self, lm_state, word, score):
        hot = self.hotword_weight * len(word) if word in self.hot_prefixes else 0.0
        return lm_state, word, score, hot

    def step(self, state, token: int):
        """The text state after appending `token`."""
        role, text = self.rules[token]
        if role == _CONT:
            return self._partial(state[0], state[1] + text, state[2])
        lm_state, score = self._complete(state)
        return self._partial(lm_state, text if role == _START else "", score)

    def final(self, state) -> float:
        """The word-level score at the end of the utterance: the partial word completed, then </s>."""
        lm_state, score = self._complete(state)
        if self.lm is not None:
            score += self.alpha * self.lm.finish(lm_state)
        return score

    def words(self, ids) -> list[str]:
        """The words the search sees in a label sequence (for inspection and tests)."""
        out, word = [], None
        for t in ids:
            role, text = self.rules[t]
            if role != _CONT and word:
                out.append(word)
            if role != _CONT:
                word = text if role == _START else ""
            else:
                word = (word or "") + text
        if word:
            out.append(word)
        return out


def _prefix_beam_search_one(frames: list[list[float]], candidates: list[list[int]], blank: int, beam_width: int,
                            words: _Words, length_norm: bool) -> list[tuple[list[int], float]]:
    """One utterance: frames[t][v] log-probs, candidates[t] the token ids considered for extensions."""
    # Label prefixes are nodes of a tree: node 0 is the empty prefix; child[(node, token)] -> node.
    parent, last, child = [-1], [-1], {}
    text = [words.initial]  # text state per node
    bonus = [0.0]  # word-level score of the node's prefix (completed words + partial hotword bonus)
    # A hypothesis is (prefix, whether its last frame was blank): beams[node] = [log p_blank, log p_non_blank].
    beams = {0: [0.0, _NEG_INF]}

    def extend(node: int, token: int) -> int:
        key = (node, token)
        n = child.get(key)
        if n is None:
            n = child[key] = len(parent)
            parent.append(node)
            last.append(token)
            if words.active:
                st = words.step(text[node], token)
                text.append(st)
                bonus.append(st[2] + st[3])
            else:
                text.append(None)
                bonus.append(0.0)
        return n

    for y, cands in zip(frames, candidates):
        y_blank = y[blank]
        nxt: dict[int, list[float]] = {}
        for node, (p_b, p_nb) in beams.items():
            p_total = _logaddexp(p_b, p_nb)
            # Stay on the same prefix: a blank, or a repeat of the last label (collapsed) after a non-blank.
            entry = nxt.get(node)
            if entry is None:
                entry = nxt[node] = [_NEG_INF, _NEG_INF]
            entry[0] = _logaddexp(entry[0], p_total + y_blank)
            prev = last[node]
            if node and p_nb != _NEG_INF:
                entry[1] = _logaddexp(entry[1], p_nb + y[prev])
            # Extend by a label; repeating the last label needs a blank in between.
            for k in cands:
                if k == blank:
                    continue
                src = p_b if k == prev else p_total
                if src == _NEG_INF:
                    continue
                new = extend(node, k)
                e = nxt.get(new)
                if e is None:
                    e = nxt[new] = [_NEG_INF, _NEG_INF]
                e[1] = _logaddexp(e[1], src + y[k])
        # Prune: keep the beam_width prefixes with the best total (both halves) plus word-level score.
        if beam_width > 1:
            beams = dict(heapq.nlargest(beam_width, nxt.items(),
                                        key=lambda kv: _logaddexp(kv[1][0], kv[1][1]) + bonus[kv[0]]))
        else:
            # A beam of one keeps a single alignment state, the best (prefix, ends in blank or not) half, not
            # both halves of the best prefix: that is best-path decoding, so without word scores it is
            # exactly ctc_greedy. (Keeping both halves would let the other half's alignments steer it.)
            # Ties go to the lower token id of the frame, as argmax does (half 0 came by blank, 1 by last[n]).
            _, _, node, half = max((p + bonus[n], -(blank if h == 0 else last[n]), n, h)
                                   for n, halves in nxt.items() for h, p in enumerate(halves) if p != _NEG_INF)
            beams = {node: [_NEG_INF, _NEG_INF]}
            beams[node][half] = nxt[node][half]

    def labels(node: int) -> list[int]:
        out = []
        while node:
            out.append(last[node])
            node = parent[node]
        return out[::-1]

    hyps = []
    for node, (p_b, p_nb) in beams.items():
        ids = labels(node)
        score = _logaddexp(p_b, p_nb) + (words.final(text[node]) if words.active else 0.0)
        if length_norm:
            score /= max(1, len(ids))
        hyps.append((ids, score))
    hyps.sort(key=lambda h: -h[1])  # stable: ties keep beam order
    return hyps


@torch.no_grad()
def ctc_beam_search_nbest(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int, beam_width: int = 8,
                          vocab=None, lm=None, alpha: float = 0.5, beta: float = 1.0, hotwords=(),
                          hotword_weight: float = 1.0, length_norm: bool = False, token_top_k: int | None = None,
                          token_min_logp: float = _NEG_INF) -> list[list[tuple[list[int], float]]]:
    """`ctc_beam_search`, returning for each utterance its final beams as (label ids, score), best first.

    A score is the natural-log CTC probability of the labelling, summed over its alignments among the
    surviving hypotheses, plus the word-level terms (LM, beta, hotwords); with `length_norm` it is
    divided by the number of labels."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if (lm is not None or hotwords) and vocab is None:
        raise ValueError("a LM or hotwords need the vocabulary (to find word boundaries)")
    words = _Words(vocab, lm, alpha, beta, hotwords, hotword_weight)
    log_probs = log_probs.detach().cpu()
    if log_probs.dtype not in (torch.float32, torch.float64):
        log_probs = log_probs.float()  # exact for half precision
    V = log_probs.shape[-1]
    if token_top_k is None:
        k = min(V, beam_width + 1)  # beam_width labels besides a possible blank
    else:
        k = V if token_top_k <= 0 else min(V, token_top_k)
    top_vals, top_ids = log_probs.topk(k, dim=-1)  # (B, T, k), best first
    # On exact ties topk may leave out the argmax (the lowest id of the best): put it first, as greedy picks it.
    best = log_probs.argmax(dim=-1, keepdim=True)  # (B, T, 1)
    missing = (top_ids != best).all(dim=-1)  # (B, T)
    top_ids[missing] = torch.cat([best, top_ids[..., :-1]], dim=-1)[missing]
    top_vals = log_probs.gather(-1, top_ids)
    results = []
    for b in range(log_probs.shape[0]):
        T = int(lengths[b])
        frames = log_probs[b, :T].double().tolist()
        ids, vals = top_ids[b, :T].tolist(), top_vals[b, :T].tolist()
        if token_min_logp != _NEG_INF:
            ids = [[i for i, v in zip(row, vrow) if v >= token_min_logp or i == am]
                   for row, vrow, am in zip(ids, vals, best[b, :T, 0].tolist())]
        results.append(_prefix_beam_search_one(frames, ids, blank, beam_width, words, length_norm))
    return results


def ctc_beam_search(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int, beam_width: int = 8, vocab=None,
                    lm=None, alpha: float = 0.5, beta: float = 1.0, hotwords=(), hotword_weight: float = 1.0,
                    length_norm: bool = False, token_top_k: int | None = None,
                    token_min_logp: float = _NEG_INF) -> list[list[int]]:
    """CTC prefix beam search over log_probs (B, T, V) (log-softmax outputs, not logits) with lengths (B,)
    valid frames per item; returns the best label ids per item, like `ctc_greedy`.

    Each hypothesis is a label prefix with two log-probabilities, of its alignments ending in a blank
    and in a label; alignments reaching the same prefix are merged by log-sum-exp, and after each frame
    the `beam_width` prefixes with the best total (plus word-level score) are kept. A beam of one keeps
    only the better half of the best prefix, a single alignment state: without LM and hotwords,
    beam_width=1 is exactly `ctc_greedy`. A wide beam finds the labelling with the highest summed
    probability.

    Only `token_top_k` labels per frame are tried as extensions (default beam_width + 1; 0 for all),
    and none below `token_min_logp` except the frame's best.

    With `lm` (an asr.lm.NgramLM) and `vocab` (a CharVocab or PieceVocab, for word boundaries), each
    completed word adds alpha * ln p_LM(word | previous words) + beta, and the end of the utterance
    alpha * ln p_LM(</s> | ...) (shallow fusion). `hotwords` (words, spelled as the vocabulary spells
    them; phrases count as their words) get hotword_weight per character while a partial word is a
    prefix of one, kept if the word ends as a hotword and dropped if not. `length_norm` ranks the
    final beams by score per label (it favours longer outputs; off by default).
    """
    nbest = ctc_beam_search_nbest(log_probs, lengths, blank, beam_width, vocab, lm, alpha, beta, hotwords,
                                  hotword_weight, length_norm, token_top_k, token_min_logp)
    return [hyps[0][0] if hyps else [] for hyps in nbest]
