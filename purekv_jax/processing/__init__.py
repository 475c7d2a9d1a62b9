"""Images, videos and chat prompts to Qwen2.5-VL and VideoLLaMA2 inputs (no torch / torchvision at run time).

See ``image.py`` (pixels to patches), ``video.py`` (PyAV decoding, fps sampling), ``tokenizer.py`` (the Qwen BPE
through ``tokenizers``), ``chat.py`` (chat template, placeholder expansion, ``Qwen25VLProcessor``) and
``videollama2.py`` (VideoLLaMA2's uniform frames, tower image processor, chat templates, ``VideoLLaMA2Processor``).
"""

from .chat import (
    DEFAULT_SYSTEM_PROMPT, QWEN25VL_CHAT_TEMPLATE, Qwen25VLProcessor, expand_placeholders, media_from_messages, media_kind,
    render_chat, user_message,
)
from .errors import (
    ImageTooSmallError, MediaFileError, NoFramesError, ProcessingError, PromptError, UnsupportedFormatError,
)
from .image import (
    IMAGE_EXTENSIONS, ImageInputs, VisionSpec, load_image, patchify, process_images, smart_resize, to_rgb_uint8,
)
from .tokenizer import (
    QWEN25_SPECIAL_TOKENS, QWEN_PAT_STR, load_tokenizer, qwen_tiktoken_path, tokenizer_from_tiktoken,
)
from .video import (
    VIDEO_EXTENSIONS, VideoInputs, VideoMetadata, probe_video, process_videos, read_video, sample_frame_indices,
)
from .videollama2 import (
    TowerImageSpec, VideoLLaMA2Processor, expand2square, prompt_segments, render_prompt, uniform_frame_indices,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "QWEN25VL_CHAT_TEMPLATE", "Qwen25VLProcessor", "expand_placeholders",
    "media_from_messages", "media_kind", "render_chat", "user_message",
    "ImageTooSmallError", "MediaFileError", "NoFramesError", "ProcessingError", "PromptError",
    "UnsupportedFormatError",
    "IMAGE_EXTENSIONS", "ImageInputs", "VisionSpec", "load_image", "patchify", "process_images", "smart_resize",
    "to_rgb_uint8",
    "QWEN25_SPECIAL_TOKENS", "QWEN_PAT_STR", "load_tokenizer", "qwen_tiktoken_path", "tokenizer_from_tiktoken",
    "VIDEO_EXTENSIONS", "VideoInputs", "VideoMetadata", "probe_video", "process_videos", "read_video",
    "sample_frame_indices",
    "TowerImageSpec", "VideoLLaMA2Processor", "expand2square", "prompt_segments", "render_prompt",
    "uniform_frame_indices",
]
