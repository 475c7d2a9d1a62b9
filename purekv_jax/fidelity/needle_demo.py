"""The first run on a real trained LM: one needle prompt answered by SmolLM2 with the full cache, the library
default and the paper's CLIE (``purekv demo`` prints it; the quickstart notebook draws its kept tokens).

The prompt is :func:`purekv_jax.fidelity.retrieval.make_prompts`' (real text from the installed texts with
"The secret code is NNNN." hidden at a seeded depth, then the question); each policy runs through ``generate``
(greedy) and its answer is checked for the code. The first answer token comes from the uncompressed prefill's
logits, so the compression shows from the second token on.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..config import PureKVConfig
from ..generation import generate
from .model import load_model
from .retrieval import RetrievalPrompt, make_prompts

#: the needle prompt of the demo: its length in tokens and the seed of its code, depth and text.
DEMO_TOKENS, DEMO_SEED = 512, 0
#: tokens decoded per answer (the code is four digits: one to four tokens after "The secret code is").
ANSWER_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class NeedleRow:
    """One policy's run: ``label``, ``policy`` (None: the full cache), the decoded ``answer``, whether it holds
    the code (``found``), the prompt's KV bytes held (``kv_bytes_kept``) and unpruned (``kv_bytes_full``),
    and the cache's kept token indices ``kept_index [L, 1, Hkv, S]``."""

    label: str
    policy: PureKVConfig | None
    answer: str
    tokens: np.ndarray
    found: bool
    kv_bytes_kept: int
    kv_bytes_full: int
    kept_index: np.ndarray
    seconds: float


@dataclasses.dataclass(frozen=True)
class NeedleDemo:
    """The prompt (``prompt.ids [N]``, ``prompt.code``, ``prompt.fact_pos``), the tokenizer and one
    :class:`NeedleRow` per policy, the full cache first."""

    prompt: RetrievalPrompt
    tokenizer: object
    rows: tuple[NeedleRow, ...]

    def agrees(self, row: NeedleRow) -> bool:
        """``row`` gave the full cache's answer token for token."""
        return bool(np.array_equal(row.tokens, self.rows[0].tokens))


def demo_policies(budget: float) -> tuple[tuple[str, PureKVConfig | None], ...]:
    """The demo's rows: the full cache, the library default and the paper's CLIE at ``budget``."""
    return (("full cache", None), (f"default PureKVConfig(budget={budget})", PureKVConfig(budget=budget)),
            (f"paper CLIE PureKVConfig.paper({budget})", PureKVConfig.paper(budget)))


def run_needle_demo(budget: float = 0.2, n_tokens: int = DEMO_TOKENS, seed: int = DEMO_SEED,
                    model_path: str | None = None) -> NeedleDemo:
    """Answers one needle prompt of ``n_tokens`` tokens with each of :func:`demo_policies` (greedy,
    :data:`ANSWER_TOKENS` tokens). ``model_path``: a GGUF text model (default: the installed SmolLM2-135M)."""
    config, params, tok = load_model(model_path)
    prompt = make_prompts(tok, n_tokens, 1, seed=seed)[0]
    ids = prompt.ids[None]
    rows = []
    for label, policy in demo_policies(budget):
        t0 = time.perf_counter()
        # the question-aligned window of the default: the prompt's question (the paper's CLIE uses a fixed one)
        question = {} if policy is None or not policy.question_window else dict(question_len=prompt.question_len)
        res = generate(params, config, ids, policy=policy, max_new_tokens=ANSWER_TOKENS, **question)
        answer = tok.decode(res.tokens[0])
        rows.append(NeedleRow(label, policy, answer, res.tokens[0], prompt.code in answer,
                              res.stats["kv_bytes_kept"], res.stats["kv_bytes_full"], res.kept_index,
                              time.perf_counter() - t0))
    return NeedleDemo(prompt, tok, tuple(rows))
