import pytest

from fedrag_app.data import Document, resolve_clients
from fedrag_app.rag.chunking import chunk_documents
from fedrag_app.rag.store import KnowledgeStore
from fedrag_app.task import build_retriever, open_store


def test_chunks_are_token_windows_with_overlap(real_paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_paths["retriever"])
    text = " ".join(f"word{i}" for i in range(200))
    chunks = chunk_documents([Document("d", text, "Title")], tok, size=50, overlap=10)
    ids = [
        tok(c.text.removeprefix("Title: "), add_special_tokens=False)["input_ids"] for c in chunks
    ]
    assert all(c.text.startswith("Title: ") for c in chunks)
    assert all(len(i) <= 50 for i in ids) and len(ids[0]) == 50
    assert ids[0][-10:] == ids[1][:10]  # the overlap
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-1][-1] == full[-1]  # nothing lost at the end
    assert len({c.id for c in chunks}) == len(chunks)
    short = chunk_documents([Document("e", "tiny text")], tok, size=50, overlap=10)
    assert [c.text for c in short] == ["tiny text"]
    with pytest.raises(ValueError, match="overlap"):
        chunk_documents([Document("e", "x")], tok, size=10, overlap=10)


def test_store_builds_once_reuses_and_rebuilds_on_change(tiny_settings, toy_root, tmp_path):
    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        first = store._target()
        assert store.count() == 6
        hits = store.search(retriever.encode_queries(["ASCII", "TCP"]), 3)
        assert [len(h) for h in hits] == [3, 3]
        assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
        assert {"id", "doc_id", "text", "score"} <= set(vars(hits[0][0]))
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        assert store._target() == first  # same corpus + encoder: reused
    changed = tiny_settings.replace(chunk_tokens=16)
    with open_store(client, changed, retriever, progress=False) as store:
        assert store._target() != first  # changed chunking: rebuilt
        assert len(store.client.get_collections().collections) == 1  # old build removed


def test_interrupted_build_is_never_taken_as_complete(tiny_settings, toy_root):
    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    calls = {"n": 0}

    def failing_embed(texts):
        calls["n"] += 1
        raise KeyboardInterrupt

    with KnowledgeStore.open("client-a", "embedded", tiny_settings.store_dir) as store:
        with pytest.raises(KeyboardInterrupt):
            store.build("abc", lambda: chunk_documents(client.corpus(), retriever.tokenizer, 32, 4),
                        failing_embed, retriever.dim, progress=False)  # fmt: skip
        assert store._target() is None and not store.is_current("abc")
        with pytest.raises(RuntimeError, match="has not been indexed"):
            store.search(retriever.encode_queries(["x"]), 1)
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        assert store.count() == 6  # the next run rebuilt it from scratch


def test_memory_and_server_modes(tiny_settings, toy_root, monkeypatch):
    client = resolve_clients([toy_root / "client-b"])[0]
    retriever = build_retriever(tiny_settings)
    with open_store(client, tiny_settings.replace(store_mode="memory"), retriever, False) as store:
        assert store.count() == 6
    with pytest.raises(ValueError, match="qdrant-url"):
        KnowledgeStore.open("x", "server")
    seen = {}

    class FakeClient:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setenv("SITE_QDRANT_KEY", "s3cret")
    monkeypatch.setattr("fedrag_app.rag.store.QdrantClient", FakeClient)
    KnowledgeStore.open(
        "x", "server", url="https://qdrant.example:6333", api_key_env="SITE_QDRANT_KEY"
    )
    assert seen == {"url": "https://qdrant.example:6333", "api_key": "s3cret"}


def test_a_locked_embedded_store_gets_a_clear_error(tmp_path):
    with KnowledgeStore.open("site", "embedded", tmp_path):
        with pytest.raises(RuntimeError, match="open in another process.*store-dir"):
            KnowledgeStore.open("site", "embedded", tmp_path)
