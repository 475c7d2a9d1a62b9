"""The carry study (docs/carry.md): scores carried across layers against the library default.

Three tasks, each one command writing ``--out/TASK_N.{json,md}``:

- ``needle``: the needle retrieval of :mod:`purekv_jax.fidelity.retrieval` (its own ``run_retrieval``);
- ``multi``: the multi-fact task of :mod:`purekv_jax.fidelity.multi_fact`, run the same way (one dense
  analysis prefill per batch of questions, each policy's cache from the prefill's own carry, answers decoded
  by ``generate``'s decode program: :func:`purekv_jax.fidelity.retrieval.policy_answers`);
- ``ppl``: continuation perplexity / KL of :func:`purekv_jax.fidelity.harness.run_fidelity` with the carry
  rows (``FidelitySettings(carry=True)``).

Command: ``python -m purekv_jax.fidelity.carry_study --task multi --lengths 1024 --prompts 4 --out docs/carry``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from ..presets import presets_in
from .harness import FidelitySettings, analysis_prefill, run_fidelity, score_policies_needed
from .model import load_model
from .multi_fact import make_prompts, score_answers
from .report import markdown_tables
from .retrieval import markdown, merge_runs, paired_markdown, policy_answers, policy_grid, run_retrieval

#: the reference every carry is paired against: today's default, ``PureKVConfig(budget=...)``.
DEFAULT_ROW = "default PureKVConfig()"
#: the study's rows: the default, then every carry preset.
CARRY_ROWS = (DEFAULT_ROW, *(p.name for p in presets_in("carry")))


def run_multi_fact(params, config, tokenizer, n_tokens: int, budgets=(0.1, 0.2, 0.4), prompts: int = 4,
                   n_facts: int = 5, names=CARRY_ROWS, batch: int = 5, max_new: int = 8, seed: int = 0,
                   log=print) -> dict:
    """Every (policy, budget) on ``prompts`` contexts x ``n_facts`` questions of ``n_tokens`` tokens -> a
    JSON-able dict shaped as :func:`purekv_jax.fidelity.retrieval.run_retrieval`'s (one result row per
    policy and budget: ``correct`` per question, plus the grades and the accuracy per depth band)."""
    t_start = time.perf_counter()
    cfg = config.text
    questions = [q for p in make_prompts(tokenizer, n_tokens, prompts, n_facts=n_facts, seed=seed) for q in p.questions]
    grid = policy_grid(cfg.num_hidden_layers, tuple(dict.fromkeys(("full", *names))))
    entries = [(name, b, make(b)) for name, make in grid.items() for b in ((1.0,) if name == "full" else budgets)]
    pols = score_policies_needed([c for _, _, c in entries])
    texts: dict[tuple, list] = {}
    kept: dict[tuple, list] = {}
    fractions: dict[tuple, list] = {}
    for s in range(0, len(questions), batch):
        chunk = questions[s : s + batch]
        ids = jnp.asarray(np.stack([q.ids for q in chunk]), jnp.int32)
        wl = jnp.asarray([q.question_len for q in chunk], jnp.int32)
        k, v, scores, logits = analysis_prefill(params, ids, wl, cfg=cfg, score_policies=pols)
        an = dict(k=k, v=v, table=dict(zip(pols, scores)), logits=logits, window_len=wl)
        for name, b, pk in entries:
            toks, kept_frac, hold, _ = policy_answers(params, config, an, pk, max_new)
            texts.setdefault((name, b), []).extend(tokenizer.decode(t) for t in toks)
            fractions.setdefault((name, b), []).append(kept_frac)
            for r, q in enumerate(chunk):
                lo, hi = q.code_span
                kept.setdefault((name, b), []).append(float(hold[:, r, :, lo:hi].all(-1).mean()))
        log(f"[multi-fact] N={n_tokens} questions {s + 1}-{s + len(chunk)} of {len(questions)} done, "
            f"{time.perf_counter() - t_start:.0f} s")
    results = []
    for (name, b), answer_texts in texts.items():
        graded = score_answers(answer_texts, questions)
        results.append({"n_prompt": n_tokens, "policy": name, "budget": b, "accuracy": graded["accuracy"],
                        "correct": [g == "right" for g in graded["grades"]], "grades": graded["grades"],
                        "other_fact": graded["other fact"], "miss": graded["miss"],
                        "bands": {k_: v_["accuracy"] for k_, v_ in graded["bands"].items()},
                        "code_kept": float(np.mean(kept[(name, b)])),
                        "kept_fraction": float(np.mean(fractions[(name, b)]))})
    return {"settings": dict(lengths=[n_tokens], budgets=list(budgets), prompts=prompts, n_facts=n_facts,
                             max_new=max_new, seed=seed, question="multi-fact"),
            "results": results, "answers": {f"{n_tokens}/{k_[0]}/{k_[1]}": v_ for k_, v_ in texts.items()},
            "depths": [q.depth for q in questions], "total_s": round(time.perf_counter() - t_start, 1)}


def report(folder: str) -> str:
    """The study's tables from the runs under ``folder`` (``needle_N.json``, ``multi_N.json``): per task,
    accuracy per policy and budget at every length, then each policy's paired wins / losses against the
    default (prompts it answers right and the default wrong / the reverse), and the multi-fact rows'
    answers taken from another fact."""
    parts = []
    for task, title in (("needle", "Needle retrieval"), ("multi", "Multi-fact retrieval")):
        runs: dict[int, list] = {}
        for p in sorted(os.listdir(folder)):
            if p.startswith(task + "_") and p.endswith(".json"):
                with open(os.path.join(folder, p)) as fh:
                    runs.setdefault(int(p[:-5].split("_")[1]), []).append(json.load(fh))
        outs = [merge_runs(runs[n]) for n in sorted(runs)]  # a length's runs (``--tag``) on the same prompts
        if not outs:
            continue
        parts += [f"## {title}", "", "\n".join(markdown(o) for o in outs), "",
                  f"Paired against `{DEFAULT_ROW}` (+right where it is wrong / -wrong where it is right):", "",
                  paired_markdown(outs, ref=DEFAULT_ROW), ""]
        if task == "multi":
            parts += ["Wrong answers that are another fact's code (of all wrong answers):", "",
                      "| N | policy | " + " | ".join(f"{int(b * 100)}%" for b in outs[0]["settings"]["budgets"]) + " |",
                      "| --- | --- |" + " --- |" * len(outs[0]["settings"]["budgets"])]
            for o in outs:
                names = dict.fromkeys(r["policy"] for r in o["results"] if r["policy"] != "full")
                for name in names:
                    cells = [f"{r['other_fact']}/{r['other_fact'] + r['miss']}" for b in o["settings"]["budgets"]
                             for r in o["results"] if r["policy"] == name and r["budget"] == b]
                    parts.append(f"| {o['settings']['lengths'][0]} | {name} | " + " | ".join(cells) + " |")
            parts.append("")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("needle", "multi", "ppl", "report"), required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--policies", nargs="*", default=list(CARRY_ROWS))
    ap.add_argument("--out", default="docs/carry")
    ap.add_argument("--tag", default="", help="appended to the output's name (TASK_N{tag}.json): a later run "
                                              "of more policies on the same prompts, merged by the report")
    a = ap.parse_args(argv)
    if a.task == "report":
        print(report(a.out))
        return
    config, params, tok = load_model()
    os.makedirs(a.out, exist_ok=True)
    for n in a.lengths:
        if a.task == "needle":
            out = run_retrieval(params, config, tok, (n,), tuple(a.budgets), a.prompts, a.batch, names=a.policies)
            md = markdown(out) + "\n\n" + paired_markdown([out], ref=DEFAULT_ROW)
        elif a.task == "multi":
            out = run_multi_fact(params, config, tok, n, tuple(a.budgets), a.prompts, names=a.policies,
                                 batch=a.batch)
            md = markdown(out) + "\n\n" + paired_markdown([out], ref=DEFAULT_ROW)
        else:
            settings = FidelitySettings(lengths=(n,), budgets=tuple(a.budgets), prompts=a.prompts, ablations=False,
                                        policies=tuple("purekv_default" if p == DEFAULT_ROW else p
                                                       for p in a.policies), carry=True)
            out = run_fidelity(params, config.text, tok, settings)
            md = markdown_tables(out)
        out["command"] = "python -m purekv_jax.fidelity.carry_study " + " ".join(argv if argv is not None else sys.argv[1:])
        tag = f"{a.task}_{n}{a.tag}"
        tmp = os.path.join(a.out, f".{tag}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, os.path.join(a.out, f"{tag}.json"))
        with open(os.path.join(a.out, f"{tag}.md"), "w") as f:
            f.write(md + "\n")
        print(md, flush=True)


if __name__ == "__main__":
    main()
