"""VideoLLaMA2 parity on tiny random configs: the tower against transformers' CLIPVisionModel /
SiglipVisionModel, the LM against MistralForCausalLM / Qwen2ForCausalLM, the STC connector against the torch
reference of ``videollama2_reference`` (itself checked on a hand-computed case), and the whole model's logits
(float32 <= 1e-4). Every torch weight reaches our model through a checkpoint folder in the release's key
layout, so the loader's name and layout mapping is under test too."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl.config_fields import ConfigError
from models.qwen2_5_vl.loader import CheckpointError
from models.videollama2 import (VideoLLaMA2Config, connector_forward, expand_placeholders, forward, load_checkpoint,
                                tiny_config, tower_forward)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from videollama2_reference import Bottleneck, STCConnector, randomize_, reference_prompt_embeds, write_reference_folder  # noqa: E402,E501

ATOL = 1e-4
COMBOS = [("mistral", "clip"), ("qwen2", "siglip")]


@dataclasses.dataclass
class Reference:
    config: VideoLLaMA2Config
    tower: object
    connector: STCConnector
    lm: object
    params: object
    folder: object


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: "-".join(c))
def reference(request, tmp_path_factory):
    """Random torch tower + connector + LM, written as one release-layout folder and loaded by us."""
    lm_type, tower = request.param
    cfg = tiny_config(lm_type=lm_type, tower=tower)
    folder = tmp_path_factory.mktemp(f"vl2_{lm_type}")
    tw, conn, lm = write_reference_folder(cfg, folder)
    loaded_cfg, params = load_checkpoint(folder)
    assert loaded_cfg == cfg
    return Reference(cfg, tw, conn, lm, params, folder)


def frames(rng, cfg, n):
    return rng.standard_normal((n, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)


def test_tower_matches_transformers(reference):
    cfg = reference.config
    pix = frames(np.random.default_rng(1), cfg, 3)
    with torch.no_grad():
        hs = reference.tower(torch.from_numpy(pix), output_hidden_states=True).hidden_states[cfg.vision.select_layer]
    expected = hs[:, 1:] if cfg.vision.kind == "clip" else hs
    ours = jax.jit(tower_forward, static_argnums=2)(reference.params.vision, jnp.asarray(pix), cfg.vision)
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=ATOL, rtol=0)


def test_connector_matches_reference(reference):
    """Both combos hold the same connector shape, so each takes one frame count: even (4) and odd (3)."""
    cfg = reference.config
    n_frames = 4 if cfg.lm_type == "mistral" else 3
    side = cfg.vision.patches_per_side
    feats = np.random.default_rng(n_frames).standard_normal((2, n_frames, side, side, cfg.connector.in_hidden))
    feats = feats.astype(np.float32)
    with torch.no_grad():
        expected = reference.connector(torch.from_numpy(feats)).numpy()
    run = jax.jit(connector_forward, static_argnums=2)  # one compile instead of every op's
    ours = np.asarray(run(reference.params.connector, jnp.asarray(feats), cfg.connector))
    t, h, w = cfg.connector.out_grid(n_frames, side, side)
    assert ours.shape == expected.shape == (2, t * h * w, cfg.connector.hidden)
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_lm_matches_transformers(reference):
    cfg = reference.config
    ids = np.random.default_rng(3).integers(3, cfg.text.vocab_size, (2, 13))
    with torch.no_grad():
        expected = reference.lm(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(forward(reference.params, cfg, ids))
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_whole_model_logits(reference):
    """Frames -> tower -> connector -> features spliced at the ``<video>`` placeholder -> LM, as the release's
    ``prepare_inputs_labels_for_multimodal`` does, against ours on the expanded prompt."""
    cfg, rng = reference.config, np.random.default_rng(4)
    pix = frames(rng, cfg, cfg.num_frames)
    before, after = rng.integers(3, cfg.text.vocab_size, 5), rng.integers(3, cfg.text.vocab_size, 7)
    embeds = reference_prompt_embeds(reference.tower, reference.connector, reference.lm, cfg, pix, before, after)
    with torch.no_grad():
        expected = reference.lm(inputs_embeds=embeds).logits.numpy()
    side = cfg.vision.patches_per_side
    grid = ((cfg.num_frames, side, side),)
    ids = expand_placeholders(np.r_[before, cfg.video_token_index, after], cfg, video_grid=grid)[None]
    ours = np.asarray(forward(reference.params, cfg, ids, pixel_values_videos=pix, video_grid_thw=grid))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- the reference, by hand
def test_reference_block_and_conv3d_by_hand():
    """The torch reference on cases small enough to compute in numpy: a Bottleneck on a 1x1 map (the 3x3
    depthwise conv reduces to its centre tap, the SE mean to the value) and the Conv3d's corner output,
    which with padding 1 sees only the input's first voxel through the kernel's last tap."""
    gen = torch.Generator().manual_seed(0)
    block = Bottleneck(4, 8)
    randomize_(block, gen, std=0.5)
    x = torch.randn(1, 4, 1, 1, generator=gen)
    with torch.no_grad():
        got = block(x)[0, :, 0, 0].numpy()
    p = {k: v.numpy().astype(np.float64) for k, v in block.state_dict().items()}
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731

    def ln(z, name):
        return (z - z.mean()) / np.sqrt(z.var() + 1e-5) * p[name + ".weight"] + p[name + ".bias"]

    xv = x.numpy()[0, :, 0, 0].astype(np.float64)
    h = silu(ln(p["conv1.conv.weight"][:, :, 0, 0] @ xv, "conv1.bn"))
    h = silu(ln(p["conv2.conv.weight"][:, 0, 1, 1] * h, "conv2.bn"))
    s = silu(p["se.fc1.weight"][:, :, 0, 0] @ h + p["se.fc1.bias"])
    h = h / (1 + np.exp(-(p["se.fc2.weight"][:, :, 0, 0] @ s + p["se.fc2.bias"])))
    h = ln(p["conv3.conv.weight"][:, :, 0, 0] @ h, "conv3.bn")
    short = ln(p["downsample.conv.weight"][:, :, 0, 0] @ xv, "downsample.bn")
    np.testing.assert_allclose(got, silu(h + short), rtol=1e-5, atol=1e-6)
    assert p["se.fc1.weight"].shape[0] == 1  # round(0.25 * in_chs), not of the bottleneck's width

    conv = STCConnector(4, 4, depth=1).sampler[0]
    vol = torch.randn(1, 4, 4, 4, 4, generator=gen)
    with torch.no_grad():
        out = conv(vol)
    assert out.shape[2:] == (3, 3, 3)  # 4 -> 4 // 2 + 1 per axis
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    np.testing.assert_allclose(out[0, :, 0, 0, 0].numpy(), w[:, :, 1, 1, 1] @ vol[0, :, 0, 0, 0].numpy() + b,
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- config and loader errors
def test_config_round_trip_and_refusals(tmp_path):
    cfg = tiny_config(lm_type="qwen2", tower="siglip")
    assert VideoLLaMA2Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf = cfg.to_hf_dict()
    with pytest.raises(ConfigError, match="mm_projector_type='stp_connector'.*not built"):
        VideoLLaMA2Config.from_hf_dict({**hf, "mm_projector_type": "stp_connector"})
    mistral = tiny_config().to_hf_dict()
    with pytest.raises(ConfigError, match="sliding_window=4096"):
        VideoLLaMA2Config.from_hf_dict({**mistral, "sliding_window": 4096})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        VideoLLaMA2Config.from_hf_dict({**hf, "use_sliding_window": True})
    no_tower = {k: v for k, v in hf.items() if k != "vision_config"}
    with pytest.raises(ConfigError, match="not one of the known towers"):
        VideoLLaMA2Config.from_hf_dict(no_tower)
    real = VideoLLaMA2Config.from_hf_dict({**no_tower, "mm_vision_tower": "google/siglip-so400m-patch14-384",
                                           "mm_hidden_size": 1152})
    assert real.vision.patches_per_side == 27 and real.vision.layers_run == 26


def test_loader_names_a_missing_tensor(reference, tmp_path):
    """The reference's release-layout folder without one tensor (a connector weight; for Qwen2, a q/k/v bias
    Mistral has none of): the loader names it."""
    from safetensors.numpy import load_file, save_file
    name = "model.mm_projector.s1.b1.downsample.conv.weight" if reference.config.lm_type == "mistral" \
        else "model.layers.1.self_attn.k_proj.bias"
    tensors = load_file(os.path.join(reference.folder, "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((reference.folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(tmp_path)
