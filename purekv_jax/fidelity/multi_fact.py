"""Multi-fact retrieval: several facts in one prompt, each question asks for one of them.

The needle task (``retrieval.py``) holds one fact, and the library default was tuned on it. This task holds
``n_facts`` distinct facts of one form in real text (``fidelity/data.py``'s texts), placed from early to late,
and asks for one at a time, so a cache must keep the right one of several look-alike facts::

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n
    [real text ... FACT(red door) ... FACT(old mill) ... FACT(iron chest) ... real text]   <- the context
    \\n\\nWhat is the code for the old mill (a four-digit number)?<|im_end|>\\n<|im_start|>assistant\\n
    The code for the old mill is                                                            <- one question

with FACT(key) = ``"\\nThe code for the {key} is {code}.\\n"``: distinct keys (two tokens each, from
:data:`KEYS`) and distinct seeded 4-digit codes. Fact ``i`` of ``n`` sits at a depth drawn uniformly in the
``i``-th of ``n`` equal strata of 5-95 % of the text, so every prompt has early, middle and late facts;
which key goes where is shuffled.

Every question of a key pool has the same token count (checked), so the context is shared: a prompt of
``n_tokens`` tokens is the context (``n_tokens - question_len`` tokens) plus any one of its questions. A
study that compresses the whole prompt uses :attr:`FactQuestion.ids`; one that compresses the context once
and asks many uses :attr:`FactQuestion.context_ids` and :attr:`FactQuestion.question_ids`.

Grading (:func:`grade_answer`): the first 4-digit number of the decoded answer is the fact's code
(``"right"``), another fact's code of the same prompt (``"other fact"``: the cache kept a look-alike), or
anything else / nothing (``"miss"``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .data import DEFAULT_SOURCES, FidelityDataError, read_text

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
USER = "<|im_start|>user\n"
FACT = "\nThe code for the {key} is {code}.\n"
QUESTION = ("\n\nWhat is the code for the {key} (a four-digit number)?<|im_end|>\n<|im_start|>assistant\n"
            "The code for the {key} is")
#: the fact keys drawn from (each two tokens in SmolLM2's vocabulary, so every question has one length).
KEYS = ("red door", "blue box", "green gate", "black safe", "white vault", "silver key", "north tower", "old mill",
        "river house", "iron chest", "stone bridge", "west wing", "glass case", "oak cabinet")
#: the answer grades, in order of merit.
GRADES = ("right", "other fact", "miss")
#: depth bands (fraction of the context's text): ``early`` below 1/3, ``late`` from 2/3.
BANDS = ("early", "middle", "late")
CODE_RE = re.compile(r"\d{4}")


class MultiFactError(FidelityDataError):
    """A request the task cannot build (too many facts, keys of unequal question length, too few tokens)."""


@dataclasses.dataclass(frozen=True)
class FactQuestion:
    """One question about one fact of one prompt.

    ``context_ids [n_tokens - question_len]`` int32 (system turn, user turn's text with every fact; shared by
    the prompt's questions), ``question_ids [question_len]`` int32, ``answer`` the fact's 4-digit code,
    ``other_answers`` the prompt's other facts' codes, ``depth`` the fact's position in the text (0..1),
    ``band`` its depth band, ``fact_pos`` the token index of the fact's first token, ``key`` its key.
    """

    context_ids: np.ndarray
    question_ids: np.ndarray
    answer: str
    other_answers: tuple[str, ...]
    depth: float
    band: str
    fact_pos: int
    fact_len: int
    key: str
    source: str

    @property
    def ids(self) -> np.ndarray:
        """The whole prompt ``[n_tokens]`` int32: the context then this question."""
        return np.concatenate([self.context_ids, self.question_ids])

    @property
    def question_len(self) -> int:
        return int(self.question_ids.shape[0])

    @property
    def code_span(self) -> tuple[int, int]:
        """``[lo, hi)`` token indices of the code's digits in the prompt (after ``"...is "``, before ``".\\n"``)."""
        return self.fact_pos + self.fact_len - 6, self.fact_pos + self.fact_len - 2


@dataclasses.dataclass(frozen=True)
class MultiFactPrompt:
    """One context with ``n_facts`` facts and one question per fact (in fact order, early to late)."""

    questions: tuple[FactQuestion, ...]

    @property
    def context_ids(self) -> np.ndarray:
        return self.questions[0].context_ids


def depth_band(depth: float) -> str:
    return BANDS[min(int(depth * 3), 2)]


def question_length(tokenizer, keys=KEYS) -> int:
    """The token count every question of ``keys`` has; raises :class:`MultiFactError` when they differ."""
    lengths = {key: len(tokenizer.encode(QUESTION.format(key=key))) for key in keys}
    if len(set(lengths.values())) != 1:
        raise MultiFactError(f"keys' questions differ in token count: {lengths}")
    return next(iter(lengths.values()))


def make_prompts(tokenizer, n_tokens: int, n_prompts: int, n_facts: int = 5, seed: int = 0,
                 sources=DEFAULT_SOURCES, keys=KEYS) -> list[MultiFactPrompt]:
    """``n_prompts`` contexts, each of ``n_tokens - question_len`` tokens holding ``n_facts`` facts, with one
    question per fact (each context + question is exactly ``n_tokens`` tokens). Keys, codes, depths and
    text offsets are drawn from ``seed`` (and ``n_tokens``); the sources are cycled over prompts."""
    if not 1 <= n_facts <= len(keys):
        raise MultiFactError(f"n_facts={n_facts}: need 1..{len(keys)} (the number of keys)")
    rng = np.random.default_rng([seed, n_tokens, n_facts])
    head = tokenizer.encode(SYSTEM + USER)
    q_len = question_length(tokenizer, keys)
    out = []
    for i in range(n_prompts):
        rel = sources[i % len(sources)]
        text = read_text(rel)
        chosen = [keys[j] for j in rng.permutation(len(keys))[:n_facts]]
        codes = [str(c) for c in rng.choice(np.arange(1000, 10000), size=n_facts, replace=False)]
        facts = [tokenizer.encode(FACT.format(key=k, code=c)) for k, c in zip(chosen, codes)]
        n_ctx = n_tokens - q_len - len(head) - sum(len(f) for f in facts)
        if n_ctx < 10 * n_facts:
            raise MultiFactError(f"n_tokens={n_tokens} leaves {n_ctx} text tokens for {n_facts} facts")
        chars = 8 * n_ctx
        if len(text) - chars <= len(text) // 10:
            raise MultiFactError(f"{rel}: {len(text)} characters are too few for {n_ctx} text tokens")
        start = int(rng.integers(len(text) // 10, len(text) - chars))
        start = text.find("\n", start) + 1 or start
        ctx = tokenizer.encode(text[start : start + chars])[:n_ctx]
        if len(ctx) < n_ctx:
            raise MultiFactError(f"{rel}: only {len(ctx)} tokens at offset {start}, need {n_ctx}")
        edges = np.linspace(0.05, 0.95, n_facts + 1)
        cuts = [int(round(rng.uniform(edges[j], edges[j + 1]) * n_ctx)) for j in range(n_facts)]
        ids, positions, prev = list(head), [], 0
        for cut, fact in zip(cuts, facts):
            ids += ctx[prev:cut]
            positions.append(len(ids))
            ids += fact
            prev = cut
        context = np.asarray(ids + ctx[prev:], np.int32)
        questions = []
        for j, (key, code, fact) in enumerate(zip(chosen, codes, facts)):
            qids = np.asarray(tokenizer.encode(QUESTION.format(key=key)), np.int32)
            questions.append(FactQuestion(
                context_ids=context, question_ids=qids, answer=code,
                other_answers=tuple(c for c in codes if c != code), depth=cuts[j] / n_ctx,
                band=depth_band(cuts[j] / n_ctx), fact_pos=positions[j], fact_len=len(fact), key=key, source=rel))
        if context.shape[0] + q_len != n_tokens:
            raise MultiFactError(f"built {context.shape[0]} + {q_len} tokens, asked for {n_tokens}")
        out.append(MultiFactPrompt(questions=tuple(questions)))
    return out


def grade_answer(text: str, question: FactQuestion) -> str:
    """One of :data:`GRADES` for the decoded answer ``text`` (its first 4-digit number decides)."""
    found = CODE_RE.search(text)
    if found is None:
        return "miss"
    if found.group() == question.answer:
        return "right"
    return "other fact" if found.group() in question.other_answers else "miss"


def score_answers(texts, questions) -> dict:
    """Accuracy and grade counts of decoded answers (one per question), overall and per depth band."""
    grades = [grade_answer(t, q) for t, q in zip(texts, questions, strict=True)]

    def summary(sel):
        g = [grades[i] for i in sel]
        return {"n": len(g), "accuracy": float(np.mean([x == "right" for x in g])) if g else float("nan"),
                **{name: g.count(name) for name in GRADES}}

    everything = range(len(grades))
    return {"grades": grades, **summary(everything),
            "bands": {b: summary([i for i in everything if questions[i].band == b]) for b in BANDS}}
