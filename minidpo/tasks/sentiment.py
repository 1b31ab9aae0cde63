"""Controlled sentiment generation in miniature: a seeded movie-review world with a known reward.

The DPO paper's first experiment (Rafailov et al. 2023, Sec. 6.1, "controlled sentiment
generation") gives a policy the prefix x of an IMDb movie review and asks it to continue the
review with positive sentiment. A pre-trained sentiment classifier plays the role of the
ground-truth reward r*(x, y); preference pairs are built by sampling continuations from the
SFT model and labelling them with that reward; success is the frontier of average reward
against KL(pi || pi_ref). This module rebuilds that experiment at a size that trains on two
CPU cores in minutes:

- **The text world** (:func:`make_reviews`). IMDb is replaced by short synthetic reviews
  written by a seeded template grammar over about 180 lowercase words (:func:`vocabulary`).
  Every review is ``opener + body``. The opener ("last night i watched this movie and",
  "the film i saw on friday was", ...) is neutral and at least ``MAX_PROMPT_WORDS + 1``
  words long, so any prompt of 1 to ``MAX_PROMPT_WORDS`` words is neutral and says nothing
  about what follows. The body is 1 to 3 sentiment clauses ("the acting was really superb",
  "i hated the ending", "it was a dull movie", "i would not recommend it"), sometimes with
  one neutral clause ("i watched it with my sister"), joined by ". ", " and " or ", but ".
  Each review draws its tone independently of its opener: positive, negative or mixed with
  probability 1/3 each, so the continuations an SFT model learns to sample range from
  clearly negative to clearly positive, which is what DPO needs to have something to move.
- **Why so small.** The policy is a 2-4 layer GPT with a context of 48-64 tokens and a
  byte-level BPE of ~500 tokens trained on the corpus, fitted in a minute or two on a CPU.
  So the world is regular (a handful of templates, each word frequent), reviews are
  ``MIN_REVIEW_WORDS``..``MAX_REVIEW_WORDS`` (12..24) words, and the vocabulary is small
  enough that a 500-token BPE makes most words one or two tokens (measured with
  :class:`minidpo.tokenizer.BPETokenizer` trained on 3000 reviews at 500 tokens: a review
  is 13-51 tokens, median 29, 99th percentile 44; at 700 tokens, at most 39). Sentiment lives
  in a few dozen interchangeable words in fixed slots, so the SFT model's samples differ
  mainly in the words DPO must learn to prefer.
- **The ground truth** (:class:`SentimentReward`). Instead of a RoBERTa classifier the
  reward is VADER (Hutto & Gilbert 2014), a lexicon and rule-based sentiment scorer that
  ships its lexicon inside the ``vaderSentiment`` package: nothing is downloaded, it is
  deterministic, and it understands the grammar's boosters ("very"), dampeners ("slightly"),
  negation ("not") and contrast ("but" weighs the second clause more). The reward is its
  compound score in [-1, 1] of the **full text**, prompt + continuation. Every sentiment
  word in the grammar is taken from VADER's lexicon with the intended sign and a valence of
  at least ``MIN_ABS_VALENCE`` (:func:`check_lexicon` verifies it), and every other word
  has no valence, so the reward is a transparent function of the words a policy chooses.
- **Preference pairs** (:func:`build_preference_pairs`). Continuations sampled from the
  SFT policy are labelled either by the Bradley-Terry model of eq. (1),
  p(y1 > y2 | x) = sigma((r*(x, y1) - r*(x, y2)) / temperature), or deterministically
  ("argmax": best against worst of the samples, as a classifier labeller would).

Text conventions: lowercase words separated by single spaces, "." and "," attached to the
word before them. A review splits into ``prompt + continuation`` at a word boundary with
no trailing space on the prompt and a leading space on the continuation (:func:`split_review`),
which is how a byte-level BPE encodes a word in running text (" word"), so encoding the
prompt and the continuation separately gives the same tokens as encoding the whole review.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..losses import sigmoid

__all__ = [
    "MAX_PROMPT_WORDS",
    "MIN_ABS_VALENCE",
    "MIN_REVIEW_WORDS",
    "MAX_REVIEW_WORDS",
    "TONES",
    "make_labeled_reviews",
    "make_reviews",
    "make_prompts",
    "split_review",
    "sft_corpus",
    "lexicon_words",
    "vocabulary",
    "check_lexicon",
    "SentimentReward",
    "build_preference_pairs",
]

MAX_PROMPT_WORDS = 5  # every opener has at least MAX_PROMPT_WORDS + 1 neutral words
MIN_ABS_VALENCE = 1.2  # every sentiment word has |VADER valence| >= this
MIN_REVIEW_WORDS = 12
MAX_REVIEW_WORDS = 24
TONES = ("positive", "negative", "mixed")

# Independent random streams derived from one user seed (numpy SeedSequence entropy lists).
_STREAM_REVIEWS = 0
_STREAM_PROMPTS = 1
_STREAM_PROMPT_LENGTHS = 2

# ----------------------------------------------------------------------------------------
# The grammar's word lists. Sentiment words: VADER lexicon valence of the intended sign,
# |valence| >= MIN_ABS_VALENCE. Everything else: absent from the lexicon (valence 0).

_POSITIVE = {
    # "the acting was superb", "it was a brilliant movie"
    "adjectives": (
        "wonderful", "brilliant", "superb", "excellent", "great", "good", "lovely",
        "beautiful", "charming", "delightful", "amazing", "fantastic", "perfect", "clever",
        "funny", "enjoyable", "pleasant", "impressive", "outstanding", "sweet", "smart",
        "strong", "exciting", "awesome",
    ),
    # "i loved the soundtrack"
    "verbs_past": ("loved", "enjoyed", "liked", "admired"),
    # "i was impressed by the cast"
    "participles": ("impressed", "charmed", "amazed"),
    # "the soundtrack delights"
    "verbs_present": ("delights", "charms", "impresses", "succeeds"),
    # "the film was a masterpiece"
    "nouns": ("masterpiece", "triumph", "delight", "joy"),
    # "i would recommend it"; negated ("i would not recommend it") in negative clauses,
    # where VADER's negation rule flips its sign
    "recommend": ("recommend",),
}

_NEGATIVE = {
    "adjectives": (
        "awful", "terrible", "horrible", "dreadful", "dull", "boring", "bad", "poor", "weak",
        "lame", "stupid", "messy", "ugly", "painful", "annoying", "disappointing", "pathetic",
        "ridiculous", "lazy", "tired", "dumb", "forced", "useless", "lousy",
    ),
    "verbs_past": ("hated", "disliked", "despised", "resented"),
    "participles": ("annoyed", "disappointed", "frustrated"),
    "verbs_present": ("fails", "disappoints", "bores", "annoys"),
    "nouns": ("disaster", "failure", "mess", "waste"),
}

# Degree words before an adjective. VADER treats some as boosters ("very" +0.293) or
# dampeners ("slightly" -0.293) and ignores the rest; none has a valence of its own.
_MODIFIERS = (
    "very", "really", "quite", "so", "incredibly", "rather", "fairly", "somewhat", "slightly",
)

# Subjects of clauses, singular and plural (verb agreement).
_SUBJECTS_SINGULAR = (
    "the acting", "the plot", "the story", "the script", "the dialogue", "the director",
    "the soundtrack", "the music", "the ending", "the cast", "the pacing", "the editing",
    "the lead actor", "the lead actress", "the first half", "the final scene",
)
_SUBJECTS_PLURAL = ("the characters", "the visuals", "the costumes", "the songs", "the actors")
_COPULA = {False: ("was", "felt", "seemed", "is"), True: ("were", "felt", "seemed", "are")}

_FILM_NOUNS = ("film", "movie", "drama", "musical", "western", "sequel")
_FILM_DETERMINERS = ("this", "this", "the new")
_WATCH_VERBS = ("watched", "saw", "rented", "streamed", "caught")
_WHEN = ("last night", "last week", "this weekend", "on friday", "on sunday", "yesterday")
_WHEN_RELEASED = ("last year", "last month", "this summer", "in the winter")
_WHERE = ("at the cinema", "at home", "on a plane", "on my laptop", "on tv")
_RELATIVES = ("sister", "brother", "mother", "father", "parents", "wife", "husband", "kids")
_PLACES = ("paris", "london", "rome", "a small town", "new york", "the desert")

# Function words used by the templates below (listed so `vocabulary()` is complete).
_TEMPLATE_WORDS = (
    "i", "and", "my", "so", "finally", "came", "out", "is", "set", "in", "was", "a", "an",
    "it", "by", "would", "not", "of", "time", "with", "the", "but",
)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _words(*parts: str) -> list[str]:
    return " ".join(p for p in parts if p).split()


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _film_np(rng: np.random.Generator) -> list[str]:
    return _words(_pick(rng, _FILM_DETERMINERS), _pick(rng, _FILM_NOUNS))


# ----------------------------------------------------------------------------------------
# Openers: neutral, at least MAX_PROMPT_WORDS + 1 words. Each returns (words, kind) where
# kind "clause" means the body starts with a full clause ("... and the plot was dull") and
# kind "predicate" means it starts with a predicate of a singular subject ("... was dull").


def _opener(rng: np.random.Generator) -> tuple[list[str], str]:
    k = int(rng.integers(8))
    watch = _pick(rng, _WATCH_VERBS)
    if k == 0:  # last night i watched this movie and
        return _words(_pick(rng, _WHEN), "i", watch) + _film_np(rng) + ["and"], "clause"
    if k == 1:  # i saw this film last week and
        return _words("i", watch) + _film_np(rng) + _words(_pick(rng, _WHEN), "and"), "clause"
    if k == 2:  # i streamed the new drama on my laptop and
        return _words("i", watch) + _film_np(rng) + _words(_pick(rng, _WHERE), "and"), "clause"
    if k == 3:  # my sister and i watched this western and
        return _words("my", _pick(rng, _RELATIVES), "and i", watch) + _film_np(rng) + ["and"], "clause"
    if k == 4:  # this movie came out last year and
        return _film_np(rng) + _words("came out", _pick(rng, _WHEN_RELEASED), "and"), "clause"
    if k == 5:  # so i finally caught this sequel and
        return _words("so i finally", watch) + _film_np(rng) + ["and"], "clause"
    if k == 6:  # this musical is set in paris and
        return _film_np(rng) + _words("is set in", _pick(rng, _PLACES), "and"), "clause"
    # the movie i saw on friday was
    return _words("the", _pick(rng, _FILM_NOUNS), "i", watch, _pick(rng, _WHEN), "was"), "predicate"


# ----------------------------------------------------------------------------------------
# Clauses. sign +1 positive, -1 negative, 0 neutral.


def _modifier(rng: np.random.Generator) -> str:
    return _pick(rng, _MODIFIERS) if rng.random() < 0.4 else ""


def _predicate(rng: np.random.Generator, sign: int, plural: bool, copula: str | None = None) -> list[str]:
    """`was very dull`, `were clever and funny`, `was a masterpiece` (singular only)."""
    lex = _POSITIVE if sign > 0 else _NEGATIVE
    k = int(rng.integers(6 if plural else 7))
    if k == 6:
        cop = copula or _pick(rng, ("was", "is"))
        noun = _pick(rng, lex["nouns"])
        return _words(cop, _article(noun), noun, "of time" if noun == "waste" else "")
    cop = copula or _pick(rng, _COPULA[plural])
    if k <= 3:
        return _words(cop, _modifier(rng), _pick(rng, lex["adjectives"]))
    a, b = rng.choice(len(lex["adjectives"]), size=2, replace=False)
    return _words(cop, lex["adjectives"][int(a)], "and", lex["adjectives"][int(b)])


def _sentiment_clause(rng: np.random.Generator, sign: int) -> list[str]:
    lex = _POSITIVE if sign > 0 else _NEGATIVE
    plural = rng.random() < 0.25
    subject = _pick(rng, _SUBJECTS_PLURAL if plural else _SUBJECTS_SINGULAR)
    k = int(rng.integers(10))
    if k <= 4:  # the acting was really superb
        return _words(subject) + _predicate(rng, sign, plural)
    if k == 5:  # i loved the soundtrack
        return _words("i", _pick(rng, lex["verbs_past"]), subject)
    if k == 6:  # i was impressed by the cast
        return _words("i was", _pick(rng, lex["participles"]), "by", subject)
    if k == 7:  # the ending disappoints  (present tense: singular subjects only)
        return _words(_pick(rng, _SUBJECTS_SINGULAR), _pick(rng, lex["verbs_present"]))
    if k == 8:  # it was a very clever movie
        mod, adj = _modifier(rng), _pick(rng, lex["adjectives"])
        return _words("it was", _article(mod or adj), mod, adj, _pick(rng, ("film", "movie")))
    # i would recommend it / i would not recommend it  (VADER negation flips "recommend")
    return _words("i would", "" if sign > 0 else "not", "recommend it")


def _neutral_clause(rng: np.random.Generator) -> list[str]:
    """`i watched it with my sister`, `it is set in rome`: opener words, no valence."""
    k = int(rng.integers(3))
    if k == 0:
        return _words("i watched it with my", _pick(rng, _RELATIVES))
    if k == 1:
        return _words("i", _pick(rng, _WATCH_VERBS), "it", _pick(rng, _WHERE))
    return _words("it is set in", _pick(rng, _PLACES))


def _body_signs(rng: np.random.Generator, tone: str) -> list[int]:
    if tone == "mixed":
        k = 2 if rng.random() < 0.7 else 3
        signs = [1, -1] + [int(_pick(rng, (1, -1)))] * (k - 2)
        signs = [signs[int(i)] for i in rng.permutation(k)]
    else:
        k = int(rng.choice(3, p=[0.3, 0.45, 0.25])) + 1
        signs = [1 if tone == "positive" else -1] * k
    if rng.random() < 0.25:  # one neutral clause, anywhere but first
        signs.insert(int(rng.integers(1, len(signs) + 1)), 0)
    return signs


def _one_review(rng: np.random.Generator, tone: str) -> str:
    opener, kind = _opener(rng)
    signs = _body_signs(rng, tone)
    words = list(opener)
    clauses: list[list[str]] = []
    used_but = False
    for i, sign in enumerate(signs):
        for _ in range(20):  # no clause twice in one review
            if i == 0 and kind == "predicate":  # "the film i saw on friday" + "was ..."
                clause = _predicate(rng, sign, plural=False, copula="was")[1:]
            elif sign == 0:
                clause = _neutral_clause(rng)
            else:
                clause = _sentiment_clause(rng, sign)
            repeats_recommend = "recommend" in clause and any("recommend" in c for c in clauses)
            if clause not in clauses and not repeats_recommend:
                break
        clauses.append(clause)
        if i > 0:
            prev = signs[i - 1]
            if prev * sign < 0 and not used_but and rng.random() < 0.6:
                words[-1] += ","  # contrast: VADER weighs the clause after "but" more
                words.append("but")
                used_but = True
            elif prev != 0 and sign == prev and rng.random() < 0.3:
                words.append("and")
            else:
                words[-1] += "."
        words.extend(clause)
    words[-1] += "."
    return " ".join(words)


# ----------------------------------------------------------------------------------------
# Public generators.


def _check_count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def make_labeled_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` reviews with the tone the grammar drew for each, deterministic in ``seed``.

    Returns a list of ``(text, tone)``, tone in :data:`TONES` ("positive", "negative",
    "mixed", each with probability 1/3, independent of the opener). The tone is what the
    grammar intended; the ground truth is :class:`SentimentReward` (a "mixed" review joined
    by "but" leans toward its second clause, for example). Every review has
    ``MIN_REVIEW_WORDS``..``MAX_REVIEW_WORDS`` words (drafts outside are redrawn).
    """
    n = _check_count("n", n)
    rng = np.random.default_rng([_check_seed(seed), _STREAM_REVIEWS])
    out = []
    while len(out) < n:
        tone = TONES[int(rng.integers(len(TONES)))]
        text = _one_review(rng, tone)
        if MIN_REVIEW_WORDS <= len(text.split()) <= MAX_REVIEW_WORDS:
            out.append((text, tone))
    return out


def make_reviews(n: int, seed: int) -> list[str]:
    """``n`` synthetic movie reviews (lowercase, single spaces), deterministic in ``seed``.

    Example: ``"last night i watched this movie and the acting was superb. the plot felt
    dull, but i loved the soundtrack."``
    """
    return [text for text, _ in make_labeled_reviews(n, seed)]


def _prompt_lengths(n_prompt_words: int | tuple[int, int], n: int, rng: np.random.Generator) -> list[int]:
    """One prompt length per review: a fixed int, or uniform on an inclusive (lo, hi)."""
    if isinstance(n_prompt_words, (tuple, list)):
        if len(n_prompt_words) != 2:
            raise ValueError(f"n_prompt_words range must be (lo, hi), got {n_prompt_words!r}")
        lo, hi = (_check_count("n_prompt_words", v) for v in n_prompt_words)
    else:
        lo = hi = _check_count("n_prompt_words", n_prompt_words)
    if not 1 <= lo <= hi <= MAX_PROMPT_WORDS:
        raise ValueError(
            f"n_prompt_words must lie in 1..{MAX_PROMPT_WORDS} (the neutral opener's length) "
            f"with lo <= hi, got {n_prompt_words!r}"
        )
    if lo == hi:
        return [lo] * n
    return [int(k) for k in rng.integers(lo, hi + 1, size=n)]


def split_review(text: str, n_prompt_words: int) -> tuple[str, str]:
    """Split ``text`` after its ``n_prompt_words``-th word: ``prompt + continuation == text``.

    The prompt ends at the last character of that word (no trailing space); the continuation
    is everything after it, so for text with single spaces it starts with ``" "``, the way a
    byte-level BPE marks a word in running text. Words are maximal runs of non-whitespace.

    Raises ValueError if the text has fewer than ``n_prompt_words + 1`` words (the
    continuation would be empty) or ``n_prompt_words < 1``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    k = n_prompt_words
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"n_prompt_words must be an int >= 1, got {n_prompt_words!r}")
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    if len(spans) <= n_prompt_words:
        raise ValueError(
            f"cannot split after word {n_prompt_words}: the text has only {len(spans)} "
            f"words and the continuation would be empty: {text!r}"
        )
    cut = spans[int(n_prompt_words) - 1]
    return text[:cut], text[cut:]


def make_prompts(
    n: int, seed: int, n_prompt_words: int | tuple[int, int] = (2, MAX_PROMPT_WORDS), unique: bool = False
) -> list[str]:
    """``n`` neutral prompts: the first words of held-out reviews.

    The reviews come from a random stream independent of ``make_reviews(., seed)`` (the same
    seed does not reuse the SFT corpus's reviews, though short prefixes of a small world
    naturally recur). ``n_prompt_words`` is an int or an inclusive range ``(lo, hi)`` drawn
    per prompt, within 1..``MAX_PROMPT_WORDS`` so every prompt lies inside a neutral opener
    (the paper's prompts are 2-8 token prefixes). ``unique=True`` returns distinct prompts
    (ValueError if the world has fewer than ``n`` of them).
    """
    n = _check_count("n", n)
    rng = np.random.default_rng([_check_seed(seed), _STREAM_PROMPTS])
    out: list[str] = []
    seen: set[str] = set()
    draws = 0
    while len(out) < n:
        text = _one_review(rng, TONES[int(rng.integers(len(TONES)))])
        k = _prompt_lengths(n_prompt_words, 1, rng)[0]
        prompt, _ = split_review(text, k)
        draws += 1
        if unique:
            if prompt in seen:
                if draws > 200 * (n + 10):
                    raise ValueError(f"found only {len(out)} distinct prompts, asked for {n}")
                continue
            seen.add(prompt)
        out.append(prompt)
    return out


def sft_corpus(
    n: int, seed: int, n_prompt_words: int | tuple[int, int] = (2, MAX_PROMPT_WORDS)
) -> list[tuple[str, str]]:
    """``make_reviews(n, seed)`` split into ``(prompt, continuation)`` pairs for SFT.

    ``prompt + continuation`` is the review; the continuation starts with ``" "``.
    ``n_prompt_words`` as in :func:`make_prompts` (an int, or an inclusive range drawn per
    review from a stream of its own, so the reviews are those of ``make_reviews(n, seed)``).
    """
    reviews = make_reviews(n, seed)
    rng = np.random.default_rng([_check_seed(seed), _STREAM_PROMPT_LENGTHS])
    lengths = _prompt_lengths(n_prompt_words, len(reviews), rng)
    return [split_review(text, k) for text, k in zip(reviews, lengths)]


# ----------------------------------------------------------------------------------------
# The vocabulary and its check against VADER's lexicon.


def lexicon_words() -> dict[str, tuple[str, ...]]:
    """The grammar's sentiment vocabulary: ``{"positive": (...), "negative": (...),
    "modifiers": (...)}``, each sorted. Positive/negative words carry VADER valence of that
    sign; modifiers (boosters, dampeners, plain degree words) carry none."""
    pos = sorted({w for group in _POSITIVE.values() for w in group})  # incl. "recommend"
    neg = sorted({w for group in _NEGATIVE.values() for w in group})
    return {"positive": tuple(pos), "negative": tuple(neg), "modifiers": tuple(sorted(_MODIFIERS))}


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar can write (sorted, punctuation excluded)."""
    groups: list[Sequence[str]] = [
        _MODIFIERS, _SUBJECTS_SINGULAR, _SUBJECTS_PLURAL, _COPULA[False], _COPULA[True],
        _FILM_NOUNS, _FILM_DETERMINERS, _WATCH_VERBS, _WHEN, _WHEN_RELEASED, _WHERE,
        _RELATIVES, _PLACES, _TEMPLATE_WORDS,
    ]
    groups += list(_POSITIVE.values()) + list(_NEGATIVE.values())
    return tuple(sorted({w for group in groups for phrase in group for w in phrase.split()}))


def check_lexicon(lexicon: dict[str, float] | None = None, min_abs_valence: float = MIN_ABS_VALENCE) -> None:
    """Verify the grammar against VADER's lexicon (word -> valence in [-4, 4]).

    Every positive word must have valence >= ``min_abs_valence``, every negative word
    <= ``-min_abs_valence``, and every other word of :func:`vocabulary` must be absent
    from the lexicon (valence 0), so sentiment comes only from the intended words.
    Raises ValueError listing every offending word.
    """
    if lexicon is None:
        lexicon = SentimentReward().lexicon
    words = lexicon_words()
    bad = [f"{w} (positive, valence {lexicon.get(w, 0.0)})" for w in words["positive"]
           if lexicon.get(w, 0.0) < min_abs_valence]
    bad += [f"{w} (negative, valence {lexicon.get(w, 0.0)})" for w in words["negative"]
            if lexicon.get(w, 0.0) > -min_abs_valence]
    sentiment = set(words["positive"]) | set(words["negative"])
    bad += [f"{w} (neutral, valence {lexicon[w]})" for w in vocabulary()
            if w not in sentiment and w in lexicon]
    if bad:
        raise ValueError("words whose VADER valence contradicts the grammar: " + ", ".join(bad))


# ----------------------------------------------------------------------------------------
# The ground-truth reward.


class SentimentReward:
    """r*(x, y) = VADER compound score of the full text ``x + y``, in [-1, 1].

    Construct once (it loads VADER's lexicon from the installed package; nothing is
    downloaded) and call on a list of texts::

        reward = SentimentReward()
        r = reward([prompt + continuation for ...])        # float64 (N,)
        r = reward.score(prompts, continuations)             # the same, concatenating

    Texts are scored whole, prompt included. Prompts from :func:`make_prompts` are neutral
    (reward 0), so including them changes nothing for this world, but scoring the full text
    keeps "but" and negation that straddle the split correct. Empty or whitespace-only text
    scores 0. Deterministic; no state changes between calls.
    """

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("the sentiment reward needs `pip install vaderSentiment`") from e
        self._analyzer = SentimentIntensityAnalyzer()

    @property
    def lexicon(self) -> dict[str, float]:
        """VADER's lexicon: word -> mean valence in [-4, 4] (read-only by convention)."""
        return self._analyzer.lexicon

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Compound scores of ``texts`` (length N) -> float64 array (N,) in [-1, 1]."""
        if isinstance(texts, str):
            raise TypeError("SentimentReward takes a list of texts, got a single str; wrap it in a list")
        out = np.zeros(len(texts), dtype=np.float64)  # (N,)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
            if t.strip():
                out[i] = self._analyzer.polarity_scores(t)["compound"]
        return out

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        """``self([p + c for p, c in zip(prompts, continuations)])``; lengths must match."""
        if isinstance(prompts, str) or isinstance(continuations, str):
            raise TypeError("score takes lists of prompts and continuations, got a str")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        return self([p + c for p, c in zip(prompts, continuations)])


# ----------------------------------------------------------------------------------------
# Preference pairs (Sec. 6.1): sample from the SFT policy, label with the ground truth.


def build_preference_pairs(
    prompts: Sequence[str],
    sample_fn: Callable[[list[str], int], list[list[str]]],
    reward_fn: Callable[[list[str]], Any],
    n_samples: int = 2,
    mode: str = "bt",
    rng: np.random.Generator | int | None = None,
    skip_ties: bool = True,
    temperature: float = 1.0,
    pairing: str = "all",
    tie_tol: float = 0.0,
    skip_empty: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label continuations sampled from the SFT policy with the ground-truth reward.

    For each prompt x, ``sample_fn([x, ...], n_samples)`` gives ``n_samples`` continuations
    y_1..y_n (each starting with " ", see :func:`split_review`) and ``reward_fn`` scores the
    full texts x + y_i, giving r_i = r*(x, y_i). Then:

    - ``mode="bt"``: for each candidate pair (y_a, y_b) (``pairing="all"``: every a < b,
      n(n-1)/2 pairs; ``"disjoint"``: (y_1, y_2), (y_3, y_4), ...), y_a is chosen with the
      Bradley-Terry probability of eq. (1),
          p(y_a > y_b | x) = sigma((r_a - r_b) / temperature),
      one uniform draw from ``rng`` per candidate pair. temperature -> 0 is a noiseless
      labeller; large temperatures approach coin flips. With ``temperature`` = 1 the labels
      follow eq. (1) with r* itself, so DPO's optimum is eq. (4) with r = r*.
    - ``mode="argmax"``: one pair per prompt: chosen = the highest-reward sample, rejected =
      the lowest-reward sample whose text differs from it (as a classifier labeller would).

    A candidate pair whose two continuations are the same string is always skipped
    (``stats["identical"]``: it carries no preference, and chosen == rejected gives DPO a
    zero gradient). A pair with ``|r_a - r_b| <= tie_tol`` is skipped when ``skip_ties``
    (``stats["ties"]``); otherwise it is kept (in "bt" it is then a fair coin). A pair with
    an empty (whitespace-only) continuation is skipped when ``skip_empty``
    (``stats["empty"]``): such a response has no token to train on, and
    :mod:`minidpo.data` refuses it. Checks run in that order; each skipped pair is counted once.

    Args:
        prompts: N prompt strings.
        sample_fn: ``(prompts: list[str], n_samples: int) -> list[list[str]]``, N lists of
            ``n_samples`` continuation strings, called once with all prompts.
        reward_fn: ``(texts: list[str]) -> array-like (N * n_samples,)``, e.g.
            :class:`SentimentReward`; called once on every ``prompt + continuation``.
        n_samples: continuations per prompt, >= 2.
        mode: "bt" or "argmax".
        rng: numpy Generator or int seed; required for "bt" (the label draws).
        skip_ties: drop pairs with equal rewards (within ``tie_tol``).
        temperature: > 0, the Bradley-Terry scale ("bt" only).
        pairing: "all" or "disjoint" ("bt" only).
        tie_tol: >= 0; rewards closer than this count as a tie.
        skip_empty: drop pairs with a whitespace-only continuation.

    Returns:
        ``(pairs, stats)``. pairs: list of dicts ``{"prompt", "chosen", "rejected",
        "chosen_reward", "rejected_reward"}`` (chosen/rejected are continuations, without the
        prompt; rewards are Python floats), in prompt order. stats (JSON-ready): ``mode``,
        ``temperature``, ``n_prompts``, ``n_samples``, ``candidates`` (pairs considered),
        ``pairs`` (kept), ``identical``, ``ties``, ``empty``, ``flipped`` (kept pairs whose chosen reward
        is lower: label noise), ``mean_reward`` (all samples), ``mean_chosen_reward``,
        ``mean_rejected_reward`` (None if no pair was kept).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str, got a single str")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 (a pair needs two samples), got {n_samples!r}")
    n_samples = int(n_samples)
    if mode not in ("bt", "argmax"):
        raise ValueError(f"mode must be 'bt' or 'argmax', got {mode!r}")
    if pairing not in ("all", "disjoint"):
        raise ValueError(f"pairing must be 'all' or 'disjoint', got {pairing!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(tie_tol, (int, float)) and tie_tol >= 0):
        raise ValueError(f"tie_tol must be a number >= 0, got {tie_tol!r}")
    if mode == "bt":
        if rng is None:
            raise ValueError("mode='bt' draws labels at random: pass rng=np.random.default_rng(seed)")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(_check_seed(rng))

    N, S = len(prompts), n_samples
    samples = sample_fn(list(prompts), S)
    if not isinstance(samples, (list, tuple)) or len(samples) != N:
        got = len(samples) if isinstance(samples, (list, tuple)) else type(samples).__name__
        raise ValueError(f"sample_fn must return {N} lists (one per prompt), got {got}")
    for i, row in enumerate(samples):
        if isinstance(row, str) or not isinstance(row, (list, tuple)) or len(row) != S:
            raise ValueError(f"sample_fn result [{i}] must be a list of {S} continuations, got {row!r}")
        for j, y in enumerate(row):
            if not isinstance(y, str):
                raise TypeError(f"sample_fn result [{i}][{j}] must be a str, got {type(y).__name__}")

    texts = [p + y for p, row in zip(prompts, samples) for y in row]
    r = np.asarray(reward_fn(texts), dtype=np.float64)
    if r.shape != (N * S,):
        raise ValueError(f"reward_fn must return shape ({N * S},) for {N * S} texts, got {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("reward_fn returned non-finite rewards")
    r = r.reshape(N, S)  # (N, S)

    # Candidate pairs (prompt i, sample a, sample b), in prompt order.
    if mode == "bt":
        if pairing == "all":
            ab = [(a, b) for a in range(S) for b in range(a + 1, S)]
        else:
            ab = [(a, a + 1) for a in range(0, S - 1, 2)]
        cand = [(i, a, b) for i in range(N) for a, b in ab]
        u = rng.random(len(cand))  # one draw per candidate pair, taken up front: deterministic
    else:
        cand = []
        for i in range(N):
            a = int(np.argmax(r[i]))
            others = [j for j in range(S) if samples[i][j] != samples[i][a]]
            b = min(others, key=lambda j: r[i, j]) if others else (a + 1) % S
            cand.append((i, a, b))

    pairs: list[dict[str, Any]] = []
    identical = ties = empty = flipped = 0
    for c, (i, a, b) in enumerate(cand):
        ya, yb, ra, rb = samples[i][a], samples[i][b], float(r[i, a]), float(r[i, b])
        if ya == yb:
            identical += 1
            continue
        if abs(ra - rb) <= tie_tol and skip_ties:
            ties += 1
            continue
        if skip_empty and not (ya.strip() and yb.strip()):
            empty += 1
            continue
        if mode == "bt":
            p_a = float(sigmoid(np.float64((ra - rb) / temperature)))  # eq. (1)
            a_wins = u[c] < p_a
        else:
            a_wins = True
        (yw, rw), (yl, rl) = ((ya, ra), (yb, rb)) if a_wins else ((yb, rb), (ya, ra))
        flipped += rw < rl
        pairs.append({"prompt": prompts[i], "chosen": yw, "rejected": yl,
                      "chosen_reward": rw, "rejected_reward": rl})

    stats = {
        "mode": mode,
        "temperature": float(temperature) if mode == "bt" else None,
        "n_prompts": N,
        "n_samples": S,
        "candidates": len(cand),
        "pairs": len(pairs),
        "identical": identical,
        "ties": ties,
        "empty": empty,
        "flipped": int(flipped),
        "mean_reward": float(r.mean()) if r.size else None,
        "mean_chosen_reward": float(np.mean([p["chosen_reward"] for p in pairs])) if pairs else None,
        "mean_rejected_reward": float(np.mean([p["rejected_reward"] for p in pairs])) if pairs else None,
    }
    return pairs, stats
