"""VideoLLaMA2 / VideoLLaMA2.1 configuration as frozen dataclasses, read from the release's ``config.json``.

The release's file is the language model's own config (``Videollama2MistralForCausalLM`` /
``Videollama2Qwen2ForCausalLM``: ``hidden_size``, ``num_hidden_layers``, ...) plus the multimodal fields
``mm_vision_tower`` (a Hub name), ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``mm_hidden_size``, ``mm_projector_type`` and ``num_frames``. The vision tower's own config lives in its Hub
repository, which cannot be read here: a nested ``vision_config`` object (the ``CLIPVisionConfig`` /
``SiglipVisionConfig`` fields) is read when present, else the tower is looked up by name in
:data:`KNOWN_TOWERS` (the two towers the releases use).

The language model reuses the Qwen2.5-VL text stack (:class:`~models.qwen2_5_vl.config.TextConfig`): a
Qwen2 / Mistral decoder with 1-D RoPE is that stack with ``mrope_section = (head_dim / 2, 0, 0)`` (every
frequency band rotates with the one position row) and, for Mistral, no q/k/v bias.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.config_fields import ConfigError, Fields, read_config_json, text_stack_hub_fields

#: the placeholders of the release's tokenizer helper (``MODAL_INDEX_MAP``): one per image / video,
#: replaced by the whole feature sequence.
IMAGE_TOKEN_INDEX = -200
VIDEO_TOKEN_INDEX = -201

#: projector types of the release that this package builds.
SUPPORTED_PROJECTORS = ("stc_connector",)
#: the release's other projector types, refused with a clear error until they are built.
KNOWN_PROJECTORS = ("stc_connector", "stc_connector_v35", "stp_connector", "mlp2x_gelu", "linear",
                    "spatial_conv", "spatial_pool")


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig:
    """A CLIP or SigLIP vision transformer applied per frame (``kind``: ``"clip"`` / ``"siglip"``).

    ``select_layer``: the hidden state taken (an index into ``hidden_states``, which holds the embeddings
    then every layer's output; -2 = the input of the last layer); ``select_feature``: ``"patch"`` drops
    CLIP's class token (SigLIP has none), ``"cls_patch"`` keeps it (CLIP only)."""

    kind: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    select_layer: int = -2
    select_feature: str = "patch"
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """Patches per side: the stride-``patch_size`` convolution drops a remainder (SigLIP: 384 px / 14)."""
        return self.image_size // self.patch_size

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_positions(self) -> int:
        return self.patches_per_side**2 + int(self.class_token)

    @property
    def layers_run(self) -> int:
        """How many encoder layers the selected hidden state needs (``hidden_states[select_layer]``)."""
        n = self.num_hidden_layers
        return self.select_layer if self.select_layer >= 0 else n + 1 + self.select_layer

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ConfigError(f"vision tower kind {self.kind!r}: expected 'clip' or 'siglip'")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision_config.image_size={self.image_size} is below patch_size={self.patch_size}")
        if not 0 <= self.layers_run <= self.num_hidden_layers:
            raise ConfigError(f"mm_vision_select_layer={self.select_layer} selects no hidden state of a "
                              f"{self.num_hidden_layers}-layer tower")
        allowed = ("patch", "cls_patch") if self.kind == "clip" else ("patch",)
        if self.select_feature not in allowed:
            raise ConfigError(f"mm_vision_select_feature={self.select_feature!r} for a {self.kind} tower: "
                              f"expected one of {allowed}")
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"vision_config.hidden_act={self.hidden_act!r} is not implemented "
                              "(quick_gelu, gelu, gelu_pytorch_tanh)")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """The STC connector: RegStage(``depth``) per frame, a 3-D convolution (kernel = stride =
    ``downsample``, padding ``padding``) + SiLU, RegStage(``depth``) again, then the readout MLP
    (``mlp_depth`` linears with GELU between). ``in_hidden``: the tower's width (``mm_hidden_size``);
    ``hidden``: the LM's."""

    in_hidden: int
    hidden: int
    projector_type: str = "stc_connector"
    depth: int = 4
    mlp_depth: int = 2
    downsample: tuple[int, int, int] = (2, 2, 2)
    padding: int = 1

    def out_grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """The token grid after the 3-D convolution for a ``(frames, rows, cols)`` feature grid."""
        return tuple((n + 2 * self.padding - k) // k + 1 for n, k in zip((t, h, w), self.downsample))


@dataclasses.dataclass(frozen=True)
class VideoLLaMA2Config:
    """The whole model: ``text`` (the LM, a :class:`~models.qwen2_5_vl.config.TextConfig`), ``vision``
    (the per-frame tower), ``connector``; ``lm_type`` ``"mistral"`` / ``"qwen2"``; ``num_frames`` sampled
    per video (an image is repeated that many times)."""

    text: TextConfig
    vision: VisionTowerConfig
    connector: ConnectorConfig
    lm_type: str = "mistral"
    num_frames: int = 8
    vision_tower_name: str = "openai/clip-vit-large-patch14-336"
    image_aspect_ratio: str = "pad"
    video_token_index: int = VIDEO_TOKEN_INDEX
    image_token_index: int = IMAGE_TOKEN_INDEX
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.connector.in_hidden != self.vision.hidden_size:
            raise ConfigError(f"mm_hidden_size={self.connector.in_hidden} differs from the vision tower's "
                              f"hidden_size={self.vision.hidden_size}")
        if self.connector.hidden != self.text.hidden_size:
            raise ConfigError(f"the connector's width {self.connector.hidden} differs from the LM's "
                              f"hidden_size={self.text.hidden_size}")
        if self.lm_type not in ("mistral", "qwen2"):
            raise ConfigError(f"language model {self.lm_type!r}: expected 'mistral' or 'qwen2'")

    @property
    def video_token_id(self) -> int:
        """The video placeholder id (the name Qwen2.5-VL's config uses, for code shared by both families)."""
        return self.video_token_index

    @property
    def image_token_id(self) -> int:
        """The image placeholder id (see :attr:`video_token_id`)."""
        return self.image_token_index

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame's features (CLIP's class token, when kept, is not part of it)."""
        p = self.vision.patches_per_side
        return p, p

    def video_token_grid(self, frames: int) -> tuple[int, int, int]:
        """(t', h', w') of the tokens the connector makes from ``frames`` frames (frame-major, then row,
        then column)."""
        return self.connector.out_grid(frames, *self.feature_grid)

    def video_tokens(self, frames: int | None = None) -> int:
        t, h, w = self.video_token_grid(self.num_frames if frames is None else frames)
        return t * h * w

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "VideoLLaMA2Config":
        """The config from the release's parsed ``config.json`` (every field's type and range checked)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(raw).__name__}")
        t = Fields(raw, "", source)
        model_type = str(raw.get("model_type", ""))
        archs = " ".join(str(a) for a in raw.get("architectures") or ())
        lm_type = "qwen2" if "qwen2" in (model_type + archs).lower() else \
            "mistral" if "mistral" in (model_type + archs).lower() else None
        if lm_type is None:
            raise ConfigError(f"{source}: model_type={model_type!r} / architectures={archs!r} name neither a "
                              "Mistral nor a Qwen2 VideoLLaMA2 (videollama2_mistral, videollama2_qwen2)")
        max_pos = t.integer("max_position_embeddings", 32_768)
        if lm_type == "mistral":
            window = t.integer("sliding_window", None, limit="max_position_embeddings")
            if window is not None and window < max_pos:
                raise ConfigError(f"{source}: sliding_window={window} (below max_position_embeddings={max_pos}) "
                                  "is not implemented; VideoLLaMA2's Mistral-7B-Instruct-v0.2 uses none")
        elif t.boolean("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true is not implemented (Qwen2-7B leaves it off)")
        heads = t.integer("num_attention_heads")
        hidden = t.integer("hidden_size")
        head_dim = t.integer("head_dim", None) or hidden // heads
        rope = t.obj("rope_parameters") or {}
        rope_theta = t.number("rope_theta", Fields(rope, "rope_parameters.", source).number("rope_theta", 1_000_000.0))
        try:
            text = TextConfig(
                vocab_size=t.integer("vocab_size"),
                hidden_size=hidden,
                intermediate_size=t.integer("intermediate_size"),
                num_hidden_layers=t.integer("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=t.integer("num_key_value_heads", heads),
                mrope_section=(head_dim // 2, 0, 0),
                rope_theta=rope_theta,
                rms_norm_eps=t.number("rms_norm_eps", 1e-6),
                max_position_embeddings=max_pos,
                tie_word_embeddings=t.boolean("tie_word_embeddings", False),
                head_dim_override=t.integer("head_dim", None),
                attention_bias=lm_type == "qwen2",
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        tower_name = raw.get("mm_vision_tower") or raw.get("vision_tower")
        if not isinstance(tower_name, str):
            raise ConfigError(f"{source}: missing required field 'mm_vision_tower' (the vision tower's name)")
        vision = _vision_config(raw, tower_name, source)
        projector = raw.get("mm_projector_type", "linear")
        if projector not in SUPPORTED_PROJECTORS:
            known = "a projector of the release that is not built here" if projector in KNOWN_PROJECTORS \
                else "an unknown projector"
            raise ConfigError(f"{source}: mm_projector_type={projector!r} is {known}; supported: "
                              f"{', '.join(SUPPORTED_PROJECTORS)}")
        connector = ConnectorConfig(in_hidden=t.integer("mm_hidden_size", None, limit="hidden_size")
                                    or vision.hidden_size, hidden=hidden, projector_type=projector)
        given = lambda key: key in raw  # noqa: E731  (an explicit null means none, a missing key the default)
        eos_default = (2,) if lm_type == "mistral" else (151645,)
        try:
            return cls(
                text=text, vision=vision, connector=connector, lm_type=lm_type,
                num_frames=t.integer("num_frames", 8),
                vision_tower_name=tower_name,
                image_aspect_ratio=str(raw.get("image_aspect_ratio", "pad")),
                bos_token_id=t.integer("bos_token_id", None, limit="token_id") if given("bos_token_id")
                else (1 if lm_type == "mistral" else None),
                eos_token_id=t.integers("eos_token_id", (), limit="token_id") if given("eos_token_id")
                else eos_default,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VideoLLaMA2Config":
        """Reads ``config.json`` (or the ``config.json`` inside a folder)."""
        path, raw = read_config_json(path)
        return cls.from_hf_dict(raw, source=path)

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        """The release's spelling (LM fields at the top, the ``mm_*`` fields, and the tower's config nested
        as ``vision_config`` so the file is complete without the Hub)."""
        t, v = self.text, self.vision
        arch = "Videollama2MistralForCausalLM" if self.lm_type == "mistral" else "Videollama2Qwen2ForCausalLM"
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": f"videollama2_{self.lm_type}",
            **text_stack_hub_fields(t),
            "sliding_window": None,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "mm_vision_tower": self.vision_tower_name,
            "mm_vision_select_layer": v.select_layer,
            "mm_vision_select_feature": v.select_feature,
            "mm_hidden_size": self.connector.in_hidden,
            "mm_projector_type": self.connector.projector_type,
            "image_aspect_ratio": self.image_aspect_ratio,
            "num_frames": self.num_frames,
            "vision_config": {
                "model_type": "clip_vision_model" if v.kind == "clip" else "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_act": v.hidden_act,
                "layer_norm_eps": v.layer_norm_eps,
                "num_channels": v.num_channels,
            },
        }
        if t.head_dim_override is not None:
            out["head_dim"] = t.head_dim_override
        return out


#: the towers of the public releases (their Hub configs), for a config.json without ``vision_config``.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6),
}


def _vision_config(raw: Mapping[str, Any], tower_name: str, source: str) -> VisionTowerConfig:
    nested = Fields(raw, "", source).obj("vision_config")
    if nested is None:
        nested = KNOWN_TOWERS.get(tower_name)
        if nested is None:
            raise ConfigError(f"{source}: mm_vision_tower={tower_name!r} is not one of the known towers "
                              f"({', '.join(KNOWN_TOWERS)}) and the file has no 'vision_config' object")
    v = Fields(nested, "vision_config.", source)
    kind_hint = str(nested.get("model_type", "")) + " " + tower_name
    kind = "siglip" if "siglip" in kind_hint.lower() else "clip" if "clip" in kind_hint.lower() else None
    if kind is None:
        raise ConfigError(f"{source}: cannot tell the vision tower's kind from mm_vision_tower={tower_name!r} "
                          "(the release accepts names containing 'clip' or 'siglip')")
    top = Fields(raw, "", source)
    select_feature = raw.get("mm_vision_select_feature", "patch")
    try:
        return VisionTowerConfig(
            kind=kind,
            hidden_size=v.integer("hidden_size"),
            intermediate_size=v.integer("intermediate_size"),
            num_hidden_layers=v.integer("num_hidden_layers", limit="depth"),
            num_attention_heads=v.integer("num_attention_heads"),
            image_size=v.integer("image_size"),
            patch_size=v.integer("patch_size"),
            hidden_act=str(nested.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")),
            layer_norm_eps=v.number("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
            select_layer=_select_layer(top),
            select_feature=str(select_feature),
            num_channels=v.integer("num_channels", 3, limit="in_channels"),
        )
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _select_layer(top: Fields) -> int:
    value = top.raw.get("mm_vision_select_layer", -2)
    if isinstance(value, bool) or not isinstance(value, int) or not -1024 <= value <= 1024:
        raise ConfigError(f"{top.source}: field 'mm_vision_select_layer' must be an integer in [-1024, 1024], "
                          f"got {value!r:.60}")
    return value


def tiny_config(*, lm_type: str = "mistral", tower: str = "clip", num_hidden_layers: int = 2,
                vocab_size: int = 1024, num_frames: int = 4) -> VideoLLaMA2Config:
    """A tiny random-weight configuration for tests and the demo.

    LM: hidden 64, 4 query / 2 KV heads (head_dim 16), ``num_hidden_layers`` layers; Mistral: bos 1, eos 2
    (its tokenizer's); Qwen2: q/k/v bias, eos ``vocab_size - 1``. Tower: hidden 32, 2 heads, 3 layers (the
    selected hidden state, -2, needs 2), 56 px frames of 14 px patches = 4 x 4 features. Connector: the
    release's (depth 4, 2 x 2 x 2 convolution with padding 1): ``num_frames`` = 4 frames give a 3 x 3 x 3
    token grid.
    """
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      mrope_section=(8, 0, 0), rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=32_768, attention_bias=lm_type == "qwen2")
    clip = tower == "clip"
    vision = VisionTowerConfig(kind=tower, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, image_size=56, patch_size=14,
                               hidden_act="quick_gelu" if clip else "gelu_pytorch_tanh",
                               layer_norm_eps=1e-5 if clip else 1e-6)
    return VideoLLaMA2Config(
        text=text, vision=vision, connector=ConnectorConfig(in_hidden=32, hidden=64), lm_type=lm_type,
        num_frames=num_frames,
        vision_tower_name="tiny-clip-vit" if clip else "tiny-siglip",
        bos_token_id=1 if lm_type == "mistral" else None,
        eos_token_id=(2,) if lm_type == "mistral" else (vocab_size - 1,),
    )
