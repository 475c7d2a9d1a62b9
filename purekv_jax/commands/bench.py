"""``purekv bench``: quality measurements on the real trained LM (see ``docs/fidelity.md``)."""

from __future__ import annotations

import argparse

from purekv_jax.fidelity import main


def _fidelity(args: argparse.Namespace) -> int:
    return main(args.extra)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="measure what each KV policy does to a real trained LM",
        description="Measurements on SmolLM2-135M-Instruct (the real LM of DATA.md) with the project's own "
                    "policy code. `purekv bench fidelity --help` lists the options.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    fid = kinds.add_parser(
        "fidelity", add_help=False,
        help="perplexity, top-1 agreement and KL of every policy at 10/20/40%% budgets, plus ablations",
        description="Forwards its options to python -m purekv_jax.fidelity.")
    fid.set_defaults(func=_fidelity, takes_extra=True)
    return p
