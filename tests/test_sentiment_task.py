"""The controlled-sentiment task: the review world, its VADER ground truth, preference pairs."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo.tasks import sentiment as S

REWARD = S.SentimentReward()
LEX = REWARD.lexicon


def _words(text):
    return [w.strip(".,") for w in text.split()]


# ------------------------------------------------------------------ the generator


def test_reviews_are_deterministic_under_the_seed():
    assert S.make_reviews(300, 7) == S.make_reviews(300, 7)
    assert S.make_prompts(200, 7) == S.make_prompts(200, 7)
    assert S.sft_corpus(200, 7) == S.sft_corpus(200, 7)
    # a longer draw extends a shorter one: n does not change the stream
    assert S.make_reviews(300, 7)[:120] == S.make_reviews(120, 7)


def test_different_seeds_differ():
    a, b = S.make_reviews(100, 0), S.make_reviews(100, 1)
    assert sum(x != y for x, y in zip(a, b)) > 90
    pa, pb = S.make_prompts(100, 0, n_prompt_words=5), S.make_prompts(100, 1, n_prompt_words=5)
    assert pa != pb
    # prompts come from a stream of their own, not from the SFT reviews of the same seed
    sft_prefixes = [S.split_review(r, 5)[0] for r in S.make_reviews(100, 0)]
    assert sum(x != y for x, y in zip(pa, sft_prefixes)) > 50


def test_review_shape_and_vocabulary():
    reviews = S.make_reviews(3000, 0)
    vocab = set(S.vocabulary())
    seen = {w for r in reviews for w in _words(r)}
    assert seen <= vocab, f"words outside the grammar's vocabulary: {sorted(seen - vocab)}"
    assert seen == vocab, f"vocabulary words never written: {sorted(vocab - seen)}"
    assert 120 <= len(vocab) <= 400
    for r in reviews:
        n = len(r.split())
        assert S.MIN_REVIEW_WORDS <= n <= S.MAX_REVIEW_WORDS, r
        assert r == r.strip() and "  " not in r and r == r.lower() and r.endswith("."), r
        assert set(r) <= set("abcdefghijklmnopqrstuvwxyz .,"), r
    assert len(set(reviews)) > 0.9 * len(reviews)  # not a handful of texts repeated


def test_tones_are_balanced_and_independent_of_the_opener():
    labeled = S.make_labeled_reviews(3000, 1)
    counts = {t: sum(1 for _, tone in labeled if tone == t) for t in S.TONES}
    for t, c in counts.items():
        assert 0.27 < c / 3000 < 0.40, counts
    by_prompt = defaultdict(list)
    for text, tone in labeled:
        by_prompt[S.split_review(text, 3)[0]].append(tone)
    big = {p: tones for p, tones in by_prompt.items() if len(tones) >= 60}
    assert len(big) >= 5
    for p, tones in big.items():
        for t in S.TONES:
            frac = tones.count(t) / len(tones)
            assert 0.15 < frac < 0.55, (p, t, frac)


# ------------------------------------------------------------------ VADER's lexicon


def test_every_sentiment_word_has_the_intended_valence():
    words = S.lexicon_words()
    assert len(words["positive"]) >= 20 and len(words["negative"]) >= 20
    assert not set(words["positive"]) & set(words["negative"])
    for w in words["positive"]:
        assert LEX.get(w, 0.0) >= S.MIN_ABS_VALENCE, (w, LEX.get(w))
    for w in words["negative"]:
        assert LEX.get(w, 0.0) <= -S.MIN_ABS_VALENCE, (w, LEX.get(w))
    sentiment = set(words["positive"]) | set(words["negative"])
    for w in S.vocabulary():
        if w not in sentiment:
            assert w not in LEX, (w, LEX[w])
    S.check_lexicon()  # the module's own check agrees


def test_check_lexicon_catches_wrong_words():
    bad = dict(LEX)
    bad["superb"] = -2.0  # a positive word with the wrong sign
    bad["awful"] = -0.5  # a negative word too weak
    bad["acting"] = 1.0  # a neutral word with valence
    with pytest.raises(ValueError) as e:
        S.check_lexicon(bad)
    msg = str(e.value)
    assert "superb" in msg and "awful" in msg and "acting" in msg and "plot" not in msg


def test_sentiment_words_score_with_their_sign_in_context():
    pos, neg = S._POSITIVE, S._NEGATIVE
    cases = []
    for sign, lex in ((1, pos), (-1, neg)):
        cases += [(sign, f"the acting was {a}.") for a in lex["adjectives"]]
        cases += [(sign, f"i {v} the plot.") for v in lex["verbs_past"]]
        cases += [(sign, f"i was {v} by the cast.") for v in lex["participles"]]
        cases += [(sign, f"the ending {v}.") for v in lex["verbs_present"]]
        cases += [(sign, f"the film was a {v}.") for v in lex["nouns"]]
    cases += [(1, "i would recommend it."), (-1, "i would not recommend it.")]
    r = REWARD([t for _, t in cases])
    for (sign, text), ri in zip(cases, r):
        assert sign * ri > 0.1, (text, ri)


# ------------------------------------------------------------------ the reward


def test_reward_contract():
    texts = ["the plot was superb.", "the plot was awful.", "", "   ", "i watched this film and"]
    r = REWARD(texts)
    assert r.dtype == np.float64 and r.shape == (5,)
    assert r[0] > 0.3 and r[1] < -0.3 and r[2] == 0.0 and r[3] == 0.0 and r[4] == 0.0
    assert np.array_equal(r, REWARD(texts))  # deterministic
    assert REWARD([]).shape == (0,) and REWARD([]).dtype == np.float64
    joined = REWARD.score(["the plot was", "x"], [" superb.", " y"])
    assert np.array_equal(joined, REWARD(["the plot was superb.", "x y"]))
    with pytest.raises(TypeError, match="single str"):
        REWARD("the plot was superb.")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        REWARD(["ok", 3])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        REWARD.score(["a", "b"], [" c"])


def test_corpus_sentiment_is_mixed():
    labeled = S.make_labeled_reviews(2000, 2)
    r = REWARD([t for t, _ in labeled])
    assert np.all((r >= -1) & (r <= 1))
    assert (r > 0.3).mean() > 0.3 and (r < -0.3).mean() > 0.3
    assert 0.05 < (np.abs(r) <= 0.3).mean() < 0.3  # some reviews in between
    tones = np.array([t for _, t in labeled])
    assert np.all(r[tones == "positive"] > 0) and np.all(r[tones == "negative"] < 0)
    mixed = r[tones == "mixed"]
    assert (mixed > 0.3).mean() > 0.15 and (mixed < -0.3).mean() > 0.15


def test_prompts_are_neutral():
    prompts = S.make_prompts(600, 3)  # default lengths 2..MAX_PROMPT_WORDS
    assert np.all(REWARD(prompts) == 0.0)
    lengths = {len(p.split()) for p in prompts}
    assert lengths == set(range(2, S.MAX_PROMPT_WORDS + 1))
    assert all(p == p.strip() for p in prompts)
    # the first MAX_PROMPT_WORDS words of any review carry no sentiment
    heads = [S.split_review(r, S.MAX_PROMPT_WORDS)[0] for r in S.make_reviews(600, 4)]
    assert np.all(REWARD(heads) == 0.0)
    assert all(LEX.get(w, 0.0) == 0.0 for h in heads for w in _words(h))


def test_make_prompts_unique_and_errors():
    p = S.make_prompts(50, 0, n_prompt_words=4, unique=True)
    assert len(set(p)) == 50 and all(len(x.split()) == 4 for x in p)
    for bad in (0, S.MAX_PROMPT_WORDS + 1, (3, 2), (1, 2, 3)):
        with pytest.raises(ValueError, match="n_prompt_words"):
            S.make_prompts(3, 0, n_prompt_words=bad)
    with pytest.raises(ValueError, match="seed"):
        S.make_reviews(3, -1)
    with pytest.raises(ValueError, match="n must"):
        S.make_reviews(-1, 0)


@pytest.mark.slow
def test_make_prompts_reports_too_few_distinct_prompts():
    """It gives up after 200 (n + 10) draws: ~100k reviews here."""
    with pytest.raises(ValueError, match="distinct prompts"):
        S.make_prompts(500, 0, n_prompt_words=1, unique=True)


# ------------------------------------------------------------------ splitting


def test_split_review_on_generated_text():
    for text in S.make_reviews(300, 5):
        for k in range(1, S.MAX_PROMPT_WORDS + 1):
            prompt, cont = S.split_review(text, k)
            assert prompt + cont == text
            assert len(prompt.split()) == k and not prompt.endswith(" ")
            assert cont.startswith(" ") and not cont.startswith("  ") and cont.strip()


@given(
    st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), min_size=1, max_size=12),
    st.integers(1, 12),
)
def test_split_review_property(chunks, k):
    text = " ".join(chunks)
    n_words = len(text.split())
    if n_words <= k:
        with pytest.raises(ValueError, match="continuation would be empty"):
            S.split_review(text, k)
        return
    prompt, cont = S.split_review(text, k)
    assert prompt + cont == text
    assert len(prompt.split()) == k and not prompt[-1].isspace()
    assert cont[0].isspace() and len(cont.split()) == n_words - k


def test_split_review_errors():
    with pytest.raises(ValueError, match="n_prompt_words"):
        S.split_review("a b c", 0)
    with pytest.raises(TypeError):
        S.split_review(["a b"], 1)


def test_sft_corpus_rebuilds_the_reviews():
    reviews = S.make_reviews(400, 9)
    pairs = S.sft_corpus(400, 9)
    assert [p + c for p, c in pairs] == reviews
    assert {len(p.split()) for p, _ in pairs} == set(range(2, S.MAX_PROMPT_WORDS + 1))
    fixed = S.sft_corpus(50, 9, n_prompt_words=3)
    assert all(len(p.split()) == 3 and c.startswith(" ") for p, c in fixed)


# ------------------------------------------------------------------ preference pairs


POOL = [c for _, c in S.sft_corpus(400, 11)]


def pool_sampler(seed):
    """A stand-in for the SFT policy: continuations drawn from the world's own reviews."""
    rng = np.random.default_rng(seed)

    def sample_fn(prompts, n):
        return [[POOL[int(i)] for i in rng.integers(len(POOL), size=n)] for _ in prompts]

    return sample_fn


def coded_sampler(prompts, n):
    """Continuations that spell their reward: " r=<value> #<index>"."""
    return [[f" r={(i * 7 + j * 3) % 11 / 5 - 1:.1f} #{j}" for j in range(n)]
            for i in range(len(prompts))]


def coded_reward(texts):
    return np.array([float(t.split("r=")[1].split()[0]) for t in texts], dtype=np.float64)


def test_argmax_pairs_are_best_against_worst():
    prompts = S.make_prompts(150, 0)
    pairs, stats = S.build_preference_pairs(prompts, pool_sampler(0), REWARD, n_samples=4, mode="argmax")
    assert stats["candidates"] == 150
    assert stats["pairs"] + stats["ties"] + stats["identical"] + stats["empty"] == 150
    assert stats["pairs"] > 120 and stats["flipped"] == 0
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"]
        assert p["chosen"] != p["rejected"]
        cr, rr = REWARD([p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]])
        assert (cr, rr) == (p["chosen_reward"], p["rejected_reward"])
    # the chosen is the best of the 4 samples and the rejected the worst: recompute them
    samples = pool_sampler(0)(prompts, 4)
    r = REWARD([x + y for x, row in zip(prompts, samples) for y in row]).reshape(150, 4)
    kept = iter(pairs)
    for i in range(150):
        if r[i].max() == r[i].min():
            continue
        p = next(kept)
        assert p["prompt"] == prompts[i]
        assert p["chosen_reward"] == r[i].max() and p["rejected_reward"] == r[i].min()
    assert stats["mean_chosen_reward"] > stats["mean_reward"] > stats["mean_rejected_reward"]
    json.dumps(stats)  # JSON-ready


def test_bt_at_low_temperature_agrees_with_argmax():
    prompts = S.make_prompts(300, 1)
    a, sa = S.build_preference_pairs(prompts, pool_sampler(3), REWARD, mode="argmax")
    b, sb = S.build_preference_pairs(
        prompts, pool_sampler(3), REWARD, mode="bt", temperature=1e-9, rng=np.random.default_rng(0)
    )
    assert a == b and len(a) > 200 and sb["flipped"] == 0
    assert sa["ties"] == sb["ties"] and sa["identical"] == sb["identical"]


def test_bt_at_high_temperature_is_a_coin_flip():
    prompts = [f"p{i}" for i in range(4000)]
    pairs, stats = S.build_preference_pairs(
        prompts, coded_sampler, coded_reward, mode="bt", temperature=1e6, rng=np.random.default_rng(1)
    )
    # 4000 prompts, ties dropped; binomial sd of the flipped fraction ~ 0.008, tolerance 6 sd
    assert stats["pairs"] > 3000
    assert abs(stats["flipped"] / stats["pairs"] - 0.5) < 0.05


def test_bt_follows_eq1_at_unit_temperature():
    # every pair has reward gap |r1 - r2| = 1.2 exactly: p(higher chosen) = sigma(1.2)
    def sampler(prompts, n):
        rows = ([" r=0.6 a", " r=-0.6 b"], [" r=-0.6 b", " r=0.6 a"])
        return [list(rows[i % 2]) for i in range(len(prompts))]

    pairs, stats = S.build_preference_pairs(
        [f"p{i}" for i in range(6000)], sampler, coded_reward, mode="bt", temperature=1.0, rng=7
    )
    want = 1 / (1 + math.exp(-1.2))
    got = 1 - stats["flipped"] / stats["pairs"]
    assert stats["pairs"] == 6000 and abs(got - want) < 0.03  # sd ~ 0.0058
    # temperature 2 halves the effective gap
    _, s2 = S.build_preference_pairs(
        [f"p{i}" for i in range(6000)], sampler, coded_reward, mode="bt", temperature=2.0, rng=7
    )
    assert abs(1 - s2["flipped"] / s2["pairs"] - 1 / (1 + math.exp(-0.6))) < 0.03


def test_bt_pairing_and_determinism():
    prompts = [f"p{i}" for i in range(30)]
    kw = dict(sample_fn=coded_sampler, reward_fn=coded_reward, n_samples=5, mode="bt")
    _, s_all = S.build_preference_pairs(prompts, rng=0, skip_ties=False, **kw)
    _, s_dis = S.build_preference_pairs(prompts, rng=0, skip_ties=False, pairing="disjoint", **kw)
    assert s_all["candidates"] == 30 * 10 and s_dis["candidates"] == 30 * 2
    assert s_all["pairs"] == 300 and s_dis["pairs"] == 60  # no identical texts, ties kept
    p1, _ = S.build_preference_pairs(prompts, rng=np.random.default_rng(5), **kw)
    p2, _ = S.build_preference_pairs(prompts, rng=np.random.default_rng(5), **kw)
    p3, _ = S.build_preference_pairs(prompts, rng=np.random.default_rng(6), **kw)
    assert p1 == p2 and p1 != p3


def test_ties_and_identical_continuations_are_skipped_and_counted():
    def sampler(prompts, n):
        rows = []
        for i in range(len(prompts)):
            if i % 3 == 0:
                rows.append([" r=0.5 same", " r=0.5 same"])  # identical text
            elif i % 3 == 1:
                rows.append([" r=0.5 one", " r=0.5 two"])  # distinct text, equal reward
            else:
                rows.append([" r=0.9 hi", " r=-0.9 lo"])
        return rows

    prompts = [f"p{i}" for i in range(30)]
    for mode in ("bt", "argmax"):
        kw = dict(mode=mode, rng=0)
        pairs, st_ = S.build_preference_pairs(prompts, sampler, coded_reward, temperature=1e-9, **kw)
        assert (st_["identical"], st_["ties"], st_["pairs"]) == (10, 10, 10), (mode, st_)
        assert all(p["chosen"] == " r=0.9 hi" for p in pairs)
        pairs, st_ = S.build_preference_pairs(prompts, sampler, coded_reward, skip_ties=False, **kw)
        assert (st_["identical"], st_["ties"], st_["pairs"]) == (10, 0, 20), (mode, st_)
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    # empty continuations: skipped and counted unless asked to keep them
    def with_empty(prompts, n):
        return [[" r=0.9 hi", "  "] if i % 2 else [" r=0.9 hi", " r=-0.9 lo"] for i in range(len(prompts))]

    def reward_empty(texts):
        return np.array([coded_reward([t])[0] if "r=" in t else 0.0 for t in texts])

    _, st_ = S.build_preference_pairs(prompts, with_empty, reward_empty, mode="argmax")
    assert (st_["empty"], st_["pairs"]) == (15, 15)
    pairs, st_ = S.build_preference_pairs(prompts, with_empty, reward_empty, mode="argmax", skip_empty=False)
    assert (st_["empty"], st_["pairs"]) == (0, 30) and pairs[1]["rejected"] == "  "
    # a tolerance widens what counts as a tie
    _, st_ = S.build_preference_pairs(prompts, sampler, coded_reward, mode="argmax", tie_tol=2.0)
    assert (st_["identical"], st_["ties"], st_["pairs"]) == (10, 20, 0)
    assert st_["mean_chosen_reward"] is None


def test_build_preference_pairs_rejects_bad_input():
    prompts = ["a", "b"]
    ok = dict(sample_fn=coded_sampler, reward_fn=coded_reward)
    with pytest.raises(ValueError, match="n_samples"):
        S.build_preference_pairs(prompts, n_samples=1, mode="argmax", **ok)
    with pytest.raises(ValueError, match="mode"):
        S.build_preference_pairs(prompts, mode="best", **ok)
    with pytest.raises(ValueError, match="rng"):
        S.build_preference_pairs(prompts, mode="bt", **ok)
    with pytest.raises(ValueError, match="temperature"):
        S.build_preference_pairs(prompts, mode="bt", rng=0, temperature=0.0, **ok)
    with pytest.raises(ValueError, match="pairing"):
        S.build_preference_pairs(prompts, mode="bt", rng=0, pairing="some", **ok)
    with pytest.raises(TypeError, match="single str"):
        S.build_preference_pairs("a", mode="argmax", **ok)
    with pytest.raises(ValueError, match="2 lists"):
        S.build_preference_pairs(prompts, lambda p, n: [[" x", " y"]], coded_reward, mode="argmax")
    with pytest.raises(ValueError, match=r"result \[1\]"):
        S.build_preference_pairs(prompts, lambda p, n: [[" x", " y"], [" x"]], coded_reward, mode="argmax")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        S.build_preference_pairs(prompts, coded_sampler, lambda t: np.zeros(3), mode="argmax")
    with pytest.raises(ValueError, match="non-finite"):
        S.build_preference_pairs(prompts, coded_sampler, lambda t: np.full(4, np.nan), mode="argmax")
