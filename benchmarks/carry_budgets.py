"""The layer budgets the allocating carries give on real needle prompts (SmolLM2-135M, 1,024 tokens, 20%).

One dense analysis prefill of two needle prompts (``fidelity/retrieval.py``'s, seed 0), then each
``carry allocate*`` preset's per-layer budgets from the prefill's own carry
(``fidelity.harness.carried_layers``): row 0's budget per layer, each row's total, and the range.

    JAX_PLATFORMS=cpu python benchmarks/carry_budgets.py > benchmarks/results/carry_budgets.txt
"""

import jax.numpy as jnp
import numpy as np

from purekv_jax.fidelity import load_model
from purekv_jax.fidelity.harness import analysis_prefill, carried_layers, score_policies_needed
from purekv_jax.fidelity.retrieval import make_prompts
from purekv_jax.presets import preset

NAMES = ("carry allocate", "carry allocate p4", "carry allocate missed")


def main():
    config, params, tok = load_model()
    prompts = make_prompts(tok, 1024, 2)
    configs = [preset(n).make(0.2, config.text.num_hidden_layers) for n in NAMES]
    pols = score_policies_needed(configs)
    ids = jnp.asarray(np.stack([p.ids for p in prompts]))
    wl = jnp.asarray([p.question_len for p in prompts], jnp.int32)
    _, v, scores, _ = analysis_prefill(params, ids, wl, cfg=config.text, score_policies=pols)
    table = dict(zip(pols, scores))
    for name, pk in zip(NAMES, configs):
        plan = pk.resolve(config.text, 1024)
        budgets = np.asarray(carried_layers(plan, table, v)[1])[:, :, 0, 0]  # [L, B]
        print(f"{name}: budget {plan.budgets[0]}, row 0 per layer {budgets[:, 0].tolist()}, "
              f"total per row {budgets.sum(0).tolist()} (uniform {plan.budgets[0] * len(plan.budgets)}), "
              f"range {budgets.min()}-{budgets.max()}")


if __name__ == "__main__":
    main()
