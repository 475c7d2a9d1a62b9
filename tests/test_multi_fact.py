"""Multi-fact retrieval task: prompt layout (lengths, fact positions, depths) and answer grading."""

from __future__ import annotations

import numpy as np
import pytest

from purekv_jax.fidelity import load_model
from purekv_jax.fidelity.multi_fact import (
    BANDS, FACT, QUESTION, MultiFactError, depth_band, grade_answer, make_prompts, score_answers,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model()[2]


@pytest.mark.parametrize("n_tokens,n_facts,seed", [(512, 5, 3), (700, 3, 11)])
def test_prompt_layout(tokenizer, n_tokens, n_facts, seed):
    prompts = make_prompts(tokenizer, n_tokens, 4, n_facts=n_facts, seed=seed)
    for prompt in prompts:
        qs = prompt.questions
        assert len(qs) == n_facts
        assert len({q.key for q in qs}) == n_facts and len({q.answer for q in qs}) == n_facts
        assert [q.depth for q in qs] == sorted(q.depth for q in qs)
        edges = np.linspace(0.05, 0.95, n_facts + 1)
        for j, q in enumerate(qs):
            assert q.ids.shape == (n_tokens,) and q.ids.dtype == np.int32
            assert q.context_ids is prompt.context_ids
            assert sorted(q.other_answers) == sorted(x.answer for x in qs if x is not q)
            # the fact's tokens sit at fact_pos, its digits at code_span; the question closes the prompt
            fact = tokenizer.encode(FACT.format(key=q.key, code=q.answer))
            assert q.fact_len == len(fact)
            assert q.ids[q.fact_pos : q.fact_pos + q.fact_len].tolist() == fact
            lo, hi = q.code_span
            assert tokenizer.decode(q.ids[lo:hi].tolist()).strip() == q.answer
            assert q.ids[-q.question_len :].tolist() == tokenizer.encode(QUESTION.format(key=q.key))
            assert edges[j] - 0.01 <= q.depth <= edges[j + 1] + 0.01
            assert q.band == BANDS[min(int(q.depth * 3), 2)]
    # seeded: the same call builds the same prompts, another seed others
    again = make_prompts(tokenizer, n_tokens, 4, n_facts=n_facts, seed=seed)
    assert all((a.context_ids == b.context_ids).all() for a, b in zip(prompts, again))
    other = make_prompts(tokenizer, n_tokens, 1, n_facts=n_facts, seed=seed + 1)
    assert other[0].questions[0].answer != prompts[0].questions[0].answer or \
        not np.array_equal(other[0].context_ids, prompts[0].context_ids)


def test_early_middle_and_late_facts(tokenizer):
    bands = {q.band for p in make_prompts(tokenizer, 512, 2, n_facts=5) for q in p.questions}
    assert bands == set(BANDS)
    assert [depth_band(d) for d in (0.0, 0.32, 0.34, 0.66, 0.67, 1.0)] == \
        ["early", "early", "middle", "middle", "late", "late"]


def test_grading_hand_cases(tokenizer):
    q = make_prompts(tokenizer, 512, 1, n_facts=3, seed=5)[0].questions[1]
    other = q.other_answers[0]
    assert grade_answer(f" {q.answer}.", q) == "right"
    assert grade_answer(f" {q.answer}1", q) == "right"  # the first four digits decide
    assert grade_answer(f" {other}. Or {q.answer}", q) == "other fact"
    assert grade_answer(" 12", q) == "miss" and grade_answer(" not given", q) == "miss"
    wrong = next(str(c) for c in range(1000, 10000) if str(c) != q.answer and str(c) not in q.other_answers)
    assert grade_answer(f" {wrong}", q) == "miss"
    qs = [q, q, q, q]
    out = score_answers([f" {q.answer}", f" {other}", " none", f"{q.answer}."], qs)
    assert out["grades"] == ["right", "other fact", "miss", "right"]
    assert (out["accuracy"], out["right"], out["other fact"], out["miss"]) == (0.5, 2, 1, 1)
    assert out["bands"][q.band]["n"] == 4 and sum(b["n"] for b in out["bands"].values()) == 4


def test_bad_requests_raise(tokenizer):
    with pytest.raises(MultiFactError, match="n_facts"):
        make_prompts(tokenizer, 512, 1, n_facts=0)
    with pytest.raises(MultiFactError, match="n_tokens=150"):
        make_prompts(tokenizer, 150, 1, n_facts=5)
    with pytest.raises(MultiFactError, match="differ in token count"):
        make_prompts(tokenizer, 512, 1, n_facts=2, keys=("red door", "the very old windmill"))
