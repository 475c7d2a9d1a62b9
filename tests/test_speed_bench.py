"""``purekv bench speed``'s pieces that need no worker process: the prompts, the medians and ratios of the
table (hand-computed cases), the argument checks, and the transformers worker never importing jax."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from purekv_jax.cli import main as cli_main
from purekv_jax.speed import standalone
from purekv_jax.speed.model import GridError, bench_small_config, parse_grid, video_prompt
from purekv_jax.speed.runner import markdown_table, summarize


def test_video_prompt_has_the_grid_s_tokens_and_patches():
    config = bench_small_config(1024)
    p = video_prompt(config, (2, 3, 4), text_before=5, text_after=7, seed=3)
    ids = p.input_ids[0]
    assert p.n_tokens == 5 + 1 + 24 + 1 + 7
    assert (ids == config.video_token_id).sum() == 24
    assert ids[5] == config.vision_start_token_id and ids[30] == config.vision_end_token_id
    m = config.vision.spatial_merge_size
    assert p.pixel_values_videos.shape == (24 * m * m, config.vision.patch_dim)
    assert p.video_grid_thw.tolist() == [[2, 3 * m, 4 * m]]


@pytest.mark.parametrize("bad", ["4x12", "4x0x3", "axbxc", "1x2x3x4", ""])
def test_parse_grid_refuses_what_is_not_three_positive_ints(bad):
    with pytest.raises(GridError, match="T x H x W"):
        parse_grid(bad)
    assert parse_grid("16X24x8") == (16, 24, 8)


def fake_result(config, prefills, decodes, peak, compile_s=1.0):
    runs = [dict(prefill_s=p, decode_s=d, decode_tokens=10) for p, d in zip(prefills, decodes)]
    return dict(config=config, grid=[1, 2, 3], runs=runs, prompt_len=100, compile_s=compile_s, load_s=0.5,
                peak_rss=peak, rss_loaded=peak // 2, rss_imports=peak // 4)


def test_summary_takes_medians_over_every_call_of_every_round_and_ratios_to_dense_and_hf():
    raw = [fake_result("dense", [1.0, 3.0], [0.5, 0.5], 400, compile_s=2.0),
           fake_result("dense", [2.0], [1.0], 600, compile_s=4.0),
           fake_result("hf", [4.0, 6.0], [1.0, 2.0], 500)]
    rows = {r["config"]: r for r in summarize(raw, ["dense", "hf"], [(1, 2, 3)])}
    dense, hf = rows["dense"], rows["hf"]
    assert dense["prefill_s"] == 2.0 and dense["calls"] == 3 and dense["prefill_min_s"] == 1.0
    assert dense["decode_tok_s"] == 20.0  # 10 tokens in 0.5 s, 0.5 s, 1.0 s -> 20, 20, 10
    assert dense["compile_s"] == 3.0 and dense["peak_rss"] == 500 and dense["prefill_tok_s"] == 50.0
    assert hf["prefill_s"] == 5.0 and hf["decode_tok_s"] == 7.5  # 10 and 5 tokens/s
    assert dense["prefill_vs_hf"] == 2.5 and dense["decode_vs_hf"] == pytest.approx(20 / 7.5)
    assert dense["peak_vs_hf"] == 1.0 and hf["prefill_vs_dense"] == 0.4
    table = markdown_table(dict(summary=list(rows.values())))
    assert "| 100 tok (1x2x3 video) | ours, full cache | 2.000 | 1.00 | 2.50 | 20.0 | 2.67 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--configs", "dense,nope"], "--configs"),
    (["--new", "1"], "--new=1 must be >= 2"),
    (["--rounds", "0"], "--rounds=0"),
    (["--budget", "1.5"], "--budget=1.5"),
    (["--grids", "4x12"], "T x H x W"),
    (["--patterns", "/nonexistent/patterns.json"], "patterns"),
])
def test_bench_speed_refuses_bad_arguments_before_any_work(argv, message, capsys, tmp_path):
    assert cli_main(["bench", "speed", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_transformers_worker_imports_neither_jax_nor_the_project():
    tree = ast.parse(pathlib.Path(standalone.__file__).read_text())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert names.isdisjoint({"jax", "jaxlib", "flax", "purekv_jax", "models", "kernels"}), names
    assert np.__name__ in names
