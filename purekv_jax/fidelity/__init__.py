"""Fidelity harness: what KV-cache compression does to a real trained model.

Importable API::

    from purekv_jax.fidelity import load_model, run_fidelity, FidelitySettings, write_report
    config, params, tokenizer = load_model()            # SmolLM2-135M-Instruct from its GGUF
    out = run_fidelity(params, config.text, tokenizer, FidelitySettings(prompts=3))
    write_report(out, "docs/fidelity")                  # fidelity.json, tables.md, fidelity.png, spearman.png

Command line: ``purekv bench fidelity`` or ``python -m purekv_jax.fidelity`` (both :func:`main`).
See ``docs/fidelity.md`` for the method, the results and their reading.
"""

from __future__ import annotations

from .data import DEFAULT_SOURCES, FidelityDataError, Window, make_windows
from .harness import (
    ABLATIONS,
    MAIN_POLICIES,
    FidelitySettings,
    analyse_prompt,
    analysis_prefill,
    build_cache,
    build_full_cache,
    clie_spearman,
    continuation_logits,
    continuation_metrics,
    layer_scores,
    policy_cache,
    run_fidelity,
    score_policies_needed,
    spearman_rows,
)
from .model import load_model
from .report import main, markdown_tables, write_report

__all__ = [
    "ABLATIONS", "DEFAULT_SOURCES", "FidelityDataError", "FidelitySettings", "MAIN_POLICIES",
    "Window", "analyse_prompt", "analysis_prefill", "build_cache", "build_full_cache", "clie_spearman",
    "continuation_logits", "continuation_metrics", "layer_scores", "load_model", "main", "make_windows",
    "markdown_tables", "policy_cache", "run_fidelity", "score_policies_needed", "spearman_rows",
    "write_report",
]
