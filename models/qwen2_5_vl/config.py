"""Qwen2.5-VL configuration as frozen dataclasses, read from a Hugging Face ``config.json``.

Both spellings found in the wild are accepted:

* the Hub files: text fields at the top level, ``rope_scaling = {"type": "mrope", "mrope_section": ...}``;
* transformers 5: a nested ``text_config`` and ``rope_parameters`` (``rope_theta`` may move inside it).

Config objects are hashable, so they can be passed to ``jax.jit`` as static arguments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from .config_fields import ConfigError, Fields, read_config_json, text_stack_hub_fields


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    tokens_per_second: float = 4.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: channels * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token (spatial_merge_size ** 2)."""
        return self.spatial_merge_size**2

    def __post_init__(self):
        if self.num_heads < 1 or self.depth < 1:
            raise ConfigError(f"vision_config.num_heads={self.num_heads} and depth={self.depth} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                f"vision_config.num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(f"vision head_dim={self.head_dim} must be a multiple of 4 (2-D rotary)")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = False
    head_dim_override: int | None = None
    #: q/k/v projections with bias (Qwen2); False for a Mistral / Llama decoder.
    attention_bias: bool = True

    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def __post_init__(self):
        if self.num_attention_heads < 1 or self.num_key_value_heads < 1:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} and num_key_value_heads="
                              f"{self.num_key_value_heads} must be >= 1")
        if self.head_dim < 2:
            raise ConfigError(f"head_dim={self.head_dim} (hidden_size={self.hidden_size} / num_attention_heads="
                              f"{self.num_attention_heads}) must be >= 2")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"mrope_section={list(self.mrope_section)} must have 3 entries summing to "
                f"head_dim/2={self.head_dim // 2}"
            )


def _built(cls, source: str, **fields):
    """``cls(**fields)``, its consistency errors prefixed with the file they come from."""
    try:
        return cls(**fields)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "Qwen25VLConfig":
        """Builds the config from a parsed Hugging Face config dict (flat or nested); every field's type and
        range is checked (:mod:`models.qwen2_5_vl.config_fields`)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(raw).__name__}")
        top = Fields(raw, "", source)
        text_raw: dict[str, Any] = dict(raw)
        nested = top.obj("text_config")
        if nested is not None:  # transformers 5: text fields nested; top-level values only fill gaps.
            text_raw = {**dict(raw), **dict(nested)}
        if top.obj("vision_config") is None:
            raise ConfigError(f"{source}: missing required field 'vision_config'")
        t = Fields(text_raw, "", source)
        v = Fields(raw["vision_config"], "vision_config.", source)

        rope = t.obj("rope_parameters") or t.obj("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigError(
                f"{source}: missing required field 'rope_scaling.mrope_section' "
                "(or 'rope_parameters.mrope_section')"
            )
        r = Fields(rope, "rope_scaling.", source)
        rope_theta = t.number("rope_theta", r.number("rope_theta", 1_000_000.0))
        text = _built(
            TextConfig, source,
            vocab_size=t.integer("vocab_size"),
            hidden_size=t.integer("hidden_size"),
            intermediate_size=t.integer("intermediate_size"),
            num_hidden_layers=t.integer("num_hidden_layers"),
            num_attention_heads=t.integer("num_attention_heads"),
            num_key_value_heads=t.integer("num_key_value_heads"),
            mrope_section=r.integers("mrope_section", length=3),
            rope_theta=rope_theta,
            rms_norm_eps=t.number("rms_norm_eps", 1e-6),
            max_position_embeddings=t.integer("max_position_embeddings", 128_000),
            tie_word_embeddings=top.boolean("tie_word_embeddings", t.boolean("tie_word_embeddings", False)),
            head_dim_override=t.integer("head_dim", None),
        )
        hidden = v.integer("hidden_size")
        depth = v.integer("depth")
        full_att = v.integers("fullatt_block_indexes", (7, 15, 23, 31), limit="token_id")
        if any(i >= depth for i in full_att):
            raise ConfigError(f"{source}: field 'vision_config.fullatt_block_indexes' must hold block numbers "
                              f"below depth={depth}, got {list(full_att)}")
        vision = _built(
            VisionConfig, source,
            depth=depth,
            hidden_size=hidden,
            num_heads=v.integer("num_heads"),
            intermediate_size=v.integer("intermediate_size"),
            out_hidden_size=v.integer("out_hidden_size", text.hidden_size),
            patch_size=v.integer("patch_size", v.integer("spatial_patch_size", 14, limit="patch_size")),
            spatial_merge_size=v.integer("spatial_merge_size", 2),
            temporal_patch_size=v.integer("temporal_patch_size", 2),
            window_size=v.integer("window_size", 112),
            fullatt_block_indexes=full_att,
            in_channels=v.integer("in_channels", v.integer("in_chans", 3, limit="in_channels")),
            tokens_per_second=v.number("tokens_per_second", 4),
        )
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"{source}: vision_config.out_hidden_size={vision.out_hidden_size} differs from the "
                f"text hidden_size={text.hidden_size}"
            )
        ids = Fields({**text_raw, **raw}, "", source)
        given = lambda key: key in ids.raw  # noqa: E731  (an explicit null means none, a missing key the default)
        eos = ids.integers("eos_token_id", (), limit="token_id") if given("eos_token_id") else (151645,)
        return cls(
            text=text,
            vision=vision,
            image_token_id=ids.integer("image_token_id", 151655, limit="token_id"),
            video_token_id=ids.integer("video_token_id", 151656, limit="token_id"),
            vision_start_token_id=ids.integer("vision_start_token_id", 151652, limit="token_id"),
            vision_end_token_id=ids.integer("vision_end_token_id", 151653, limit="token_id"),
            bos_token_id=ids.integer("bos_token_id", None, limit="token_id") if given("bos_token_id") else 151643,
            eos_token_id=eos,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
        """Reads ``config.json`` (or the ``config.json`` inside a folder)."""
        path, raw = read_config_json(path)
        return cls.from_hf_dict(raw, source=path)

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        """The Hub (flat) spelling, loadable by transformers and by :meth:`from_hf_dict`."""
        t, v = self.text, self.vision
        out: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **text_stack_hub_fields(t),
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "in_channels": v.in_channels,
                # transformers validates this field as an int; keep a fractional value as is.
                "tokens_per_second": (
                    int(v.tokens_per_second) if float(v.tokens_per_second).is_integer() else v.tokens_per_second
                ),
                "hidden_act": "silu",
            },
        }
        if t.head_dim_override is not None:
            out["head_dim"] = t.head_dim_override
        return out


def tiny_config(
    *,
    num_hidden_layers: int = 2,
    vocab_size: int = 1024,
    tie_word_embeddings: bool = False,
    vision_depth: int = 2,
) -> Qwen25VLConfig:
    """A tiny random-weight configuration for tests and the built-in example.

    With the default vocabulary of 1024 the special tokens move to the top of it (vision start
    1000, vision end 1001, image pad 1003, video pad 1004, eos 999); with ``vocab_size`` above
    151,656 the real Qwen ids are kept.
    Text: hidden 64, 4 query / 2 KV heads (head_dim 16, mrope_section (2, 3, 3)).
    Vision: hidden 32, 2 heads (head_dim 16), window 112 px = 4 merged tokens per side.
    """
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        rope_theta=1_000_000.0,
        max_position_embeddings=32_768,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision = VisionConfig(
        depth=vision_depth,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        fullatt_block_indexes=(vision_depth - 1,),
        tokens_per_second=2.0,
    )
    if vocab_size > 151_656:
        return Qwen25VLConfig(text=text, vision=vision)
    return Qwen25VLConfig(
        text=text,
        vision=vision,
        vision_start_token_id=1000,
        vision_end_token_id=1001,
        image_token_id=1003,
        video_token_id=1004,
        bos_token_id=998,
        eos_token_id=(999,),
    )
