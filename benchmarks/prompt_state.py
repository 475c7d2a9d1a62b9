"""Compress once, ask many, on the real SmolLM2: accuracy, answer time and cache memory (docs/prompt_state.md).

Task: :mod:`purekv_jax.fidelity.multi_fact` (five facts per context, one question per fact). Per context:

* question-aware (``purekv``, the library default): the question is part of the prompt that is compressed,
  so every question re-runs the prefill (``generate(context + question, question_len=...)``);
* question-agnostic (``agnostic_tail``, ``agnostic_probe``) and the full cache: ``prefill_prompt(context)``
  once, then ``answer(state, question)`` for each of the five questions;

Times are medians over the questions after a warm-up (compiles excluded), measured side by side in one run.
Memory: one state answered with 1,000 tokens (EOS ignored), with and without a decode-time budget.

Command: ``PYTHONPATH=$PWD python benchmarks/prompt_state.py --prompts 8 --tokens 1024 --budget 0.2
--out docs/prompt_state``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from purekv_jax import cache as C
from purekv_jax import generation as G
from purekv_jax import prompt_state as PS
from purekv_jax.decode_budget import DecodeBudget
from purekv_jax.fidelity.model import load_model
from purekv_jax.fidelity.multi_fact import BANDS, make_prompts, score_answers
from purekv_jax.presets import preset

MAX_NEW = 8
AGNOSTIC = ("agnostic_tail", "agnostic_probe")


def text_of(tokenizer, tokens, eos) -> str:
    out = []
    for t in tokens:
        if int(t) in eos:
            break
        out.append(int(t))
    return tokenizer.decode(out)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    return out, time.perf_counter() - t0


def accuracy_and_time(params, config, tok, prompts, budget):
    eos = tuple(config.eos_token_id)
    rows = {name: {"texts": [], "answer_s": [], "prefill_s": []} for name in ("full", "purekv", *AGNOSTIC)}
    questions = [q for p in prompts for q in p.questions]
    probe = np.asarray(tok.encode(preset("agnostic_probe").probe), np.int32)
    for i, p in enumerate(tqdm(prompts, desc="contexts")):
        ctx = p.context_ids[None]
        for name in ("full", *AGNOSTIC):
            policy = None if name == "full" else preset(name).make(budget)
            extra = dict(probe_ids=probe) if name == "agnostic_probe" else {}
            state, dt = timed(lambda: PS.prefill_prompt(params, config, ctx, policy=policy, **extra))
            rows[name]["prefill_s"].append(dt)
            for q in p.questions:
                (tokens, _), dt = timed(lambda: PS.answer(params, state, q.question_ids[None], max_new_tokens=MAX_NEW))
                rows[name]["texts"].append(text_of(tok, tokens[0], eos))
                rows[name]["answer_s"].append(dt if i else None)  # the first context compiles
        aware = preset("purekv").make(budget)
        for q in p.questions:
            res, dt = timed(lambda: G.generate(params, config, q.ids[None], policy=aware, max_new_tokens=MAX_NEW,
                                               question_len=q.question_len))
            rows["purekv"]["texts"].append(text_of(tok, res.tokens[0], eos))
            rows["purekv"]["answer_s"].append(dt if i else None)
    # re-running the prefill for each question with a question-agnostic policy (what the kept cache saves)
    rerun = []
    for p in prompts[1:]:
        for q in p.questions:
            _, dt = timed(lambda: G.generate(params, config, q.ids[None], policy=preset("agnostic_tail").make(budget),
                                             max_new_tokens=MAX_NEW))
            rerun.append(dt)
    table = {}
    for name, row in rows.items():
        scored = score_answers(row["texts"], questions)
        times = [t for t in row["answer_s"] if t is not None]
        table[name] = {"accuracy": scored["accuracy"], "other_fact": scored["other fact"], "miss": scored["miss"],
                       "bands": {b: scored["bands"][b]["accuracy"] for b in BANDS},
                       "answer_s_median": statistics.median(times),
                       "prefill_s_median": statistics.median(row["prefill_s"]) if row["prefill_s"] else None,
                       "answers": row["texts"]}
    table["agnostic_tail, prefill re-run per question"] = {"answer_s_median": statistics.median(rerun)}
    return table


def memory(params, config, prompt, budget, answer_len: int):
    ctx = prompt.context_ids[None]
    policy = preset("agnostic_tail").make(budget)
    out = {}
    for name, decode_budget in (("growing", None), ("decode budget", "auto")):
        state = PS.prefill_prompt(params, config, ctx, policy=policy)
        if decode_budget == "auto":  # the prompt's slots plus room for one question block and the recent window
            decode_budget = DecodeBudget(slots=state.kv.capacity + 64, recent=32)
            state = PS.prefill_prompt(params, config, ctx, policy=policy, decode_budget=decode_budget)
        before = (C.kv_bytes_allocated(state.kv), C.kv_bytes_kept(state.kv))
        (_, after), dt = timed(lambda: PS.answer(params, state, prompt.questions[0].question_ids[None],
                                                 max_new_tokens=answer_len, eos_token_id=()))
        out[name] = {"slots": None if decode_budget is None else decode_budget.slots,
                     "allocated_before": before[0], "held_before": before[1],
                     "allocated_after": C.kv_bytes_allocated(after.kv), "held_after": C.kv_bytes_kept(after.kv),
                     "answer_tokens": answer_len, "seconds": dt}
    return out


def markdown(acc, mem, args) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"
    lines = [f"prompts: {args.prompts} contexts x 5 questions, {args.tokens} tokens each (context + question), "
             f"budget {args.budget}, greedy, {MAX_NEW} new tokens", "",
             "| policy | accuracy | other fact | miss | early | middle | late | median s / question | median prefill s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in acc.items():
        if "accuracy" not in row:
            continue
        b = row["bands"]
        pre = "" if row["prefill_s_median"] is None else f"{row['prefill_s_median']:.3f}"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['other_fact']} | {row['miss']} | {b['early']:.2f} | "
                     f"{b['middle']:.2f} | {b['late']:.2f} | {row['answer_s_median']:.3f} | {pre} |")
    rerun = acc["agnostic_tail, prefill re-run per question"]["answer_s_median"]
    kept = acc["agnostic_tail"]["answer_s_median"]
    lines += ["", "| answering one question (agnostic_tail) | median s | ratio |", "| --- | --- | --- |",
              f"| from the kept cache (answer) | {kept:.3f} | 1.00 |",
              f"| re-running the prefill (generate on context + question) | {rerun:.3f} | {rerun / kept:.2f} |", "",
              "| cache over a 1,000-token answer | slots | allocated before MiB | held before MiB | allocated after MiB "
              "| held after MiB | s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in mem.items():
        lines.append(f"| {name} | {row['slots'] or 'grows'} | {mib(row['allocated_before'])} | {mib(row['held_before'])} | "
                     f"{mib(row['allocated_after'])} | {mib(row['held_after'])} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--answer-len", type=int, default=1000)
    ap.add_argument("--out", default="docs/prompt_state")
    args = ap.parse_args()
    config, params, tok = load_model()
    prompts = make_prompts(tok, args.tokens, args.prompts, n_facts=5)
    acc = accuracy_and_time(params, config, tok, prompts, args.budget)
    mem = memory(params, config, prompts[0], args.budget, args.answer_len)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "accuracy": acc, "memory": mem}, f, indent=1)
    text = markdown(acc, mem, args)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
