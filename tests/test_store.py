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
        first = store.published()
        assert store.count() == 6
        hits = store.search(retriever.encode_queries(["ASCII", "TCP"]), 3)
        assert [len(h) for h in hits] == [3, 3]
        assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
        assert {"id", "doc_id", "text", "score"} <= set(vars(hits[0][0]))
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        assert store.published() == first  # same corpus + encoder: reused
    changed = tiny_settings.replace(chunk_tokens=16)
    with open_store(client, changed, retriever, progress=False) as store:
        assert store.published() != first  # changed chunking: rebuilt
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
        assert store.published() is None and not store.is_current("abc")
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


def test_two_builders_of_one_store_on_one_server_never_break_each_other(tiny_settings, toy_root):
    """One Qdrant server (qdrant-client's embedded engine, the same client API), two processes
    building the same store at once: B starts and finishes inside A's build."""
    from qdrant_client import QdrantClient

    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    server = QdrantClient(location=":memory:")
    a, b = KnowledgeStore(server, "site-a"), KnowledgeStore(server, "site-a")

    def chunks():
        return chunk_documents(client.corpus(), retriever.tokenizer, 32, 4)

    def chunks_while_b_builds():
        assert b.build("fp", chunks, retriever.encode_contexts, retriever.dim, progress=False)
        return chunks()

    # A is still writing when B publishes the same fingerprint: A keeps B's and drops its own
    built = a.build("fp", chunks_while_b_builds, retriever.encode_contexts, retriever.dim,
                    progress=False)  # fmt: skip
    assert built is False and a.is_current("fp") and a.count() == 6
    assert len(server.get_collections().collections) == 1
    hits = a.search(retriever.encode_queries(["TCP"]), 2)
    assert len(hits[0]) == 2


def test_sites_sharing_a_server_are_named_by_site_id(tiny_settings, toy_root, tmp_path):
    """Two sites whose folders are both called 'data' (as in the compose file) keep their own
    stores on one server when their policies give them their own site-id."""
    import shutil

    from qdrant_client import QdrantClient

    from fedrag_app.site import SitePolicy, node_client

    folders = []
    for name in ("client-a", "client-b"):
        folder = tmp_path / name / "data"
        shutil.copytree(toy_root / name, folder)
        folders.append(folder)
    sites = [
        node_client({}, SitePolicy(data_path=str(f), site_id=f"hospital-{i}"), tiny_settings)
        for i, f in enumerate(folders)
    ]
    assert [s.name for s in sites] == ["hospital-0", "hospital-1"]
    retriever = build_retriever(tiny_settings)
    server = QdrantClient(location=":memory:")
    for site in sites:
        store = KnowledgeStore(server, site.name)
        store.build("fp-" + site.name, lambda site=site: chunk_documents(
            site.corpus(), retriever.tokenizer, 32, 4), retriever.encode_contexts, retriever.dim,
            progress=False)  # fmt: skip
    counts = [KnowledgeStore(server, s.name).count() for s in sites]
    assert counts == [6, 6] and len(server.get_collections().collections) == 2


def test_an_interrupted_builder_does_not_destroy_another_builders_points(tiny_settings, toy_root):
    """B starts building the same store while A is between two batches, then dies: A's first
    batch must survive (with one shared collection per fingerprint, B deleted it)."""
    from qdrant_client import QdrantClient

    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    server = QdrantClient(location=":memory:")
    a, b = KnowledgeStore(server, "site-a"), KnowledgeStore(server, "site-a")
    calls = {"n": 0}

    def chunks():
        return chunk_documents(client.corpus(), retriever.tokenizer, 32, 4)

    def dies(texts):
        raise RuntimeError("builder B stopped")

    def embed_a(texts):
        calls["n"] += 1
        if calls["n"] == 2:  # A has upserted its first batch
            with pytest.raises(RuntimeError, match="builder B stopped"):
                b.build("fp", chunks, dies, retriever.dim, progress=False)
        return retriever.encode_contexts(texts)

    assert a.build("fp", chunks, embed_a, retriever.dim, batch_size=2, progress=False)
    assert a.is_current("fp") and a.count() == 6  # every chunk, none lost to B


def _crashed_build(server, name: str, started: float, dim: int) -> str:
    """What a builder killed mid-build leaves behind: an unpublished, half-filled collection."""
    from qdrant_client import models

    collection = f"{name}--fp--{int(started):x}-deadbeef"
    server.create_collection(
        collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
    )
    server.upsert(collection, points=[models.PointStruct(id=1, vector=[1.0] * dim)])
    return collection


def test_a_crashed_build_in_an_embedded_folder_is_deleted_by_the_next_build(
    tiny_settings, toy_root, tmp_path
):
    """One process at a time opens an embedded folder, so any unpublished build is dead."""
    import time

    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    with KnowledgeStore.open("site-a", "embedded", tmp_path) as store:
        crashed = _crashed_build(store.client, "site-a", time.time(), retriever.dim)
        other_site = _crashed_build(store.client, "site-a--b", time.time(), retriever.dim)
        assert store.build("fp", lambda: chunk_documents(client.corpus(), retriever.tokenizer,
                           32, 4), retriever.encode_contexts, retriever.dim, progress=False)  # fmt: skip
        names = {c.name for c in store.client.get_collections().collections}
        assert crashed not in names and other_site in names and len(names) == 2
        assert store.count() == 6


def test_on_a_server_only_stale_crashed_builds_are_deleted(tiny_settings, toy_root):
    """On a shared server a fresh unpublished build may be another process's live one."""
    import time

    from qdrant_client import QdrantClient

    from fedrag_app.rag.store import STALE_BUILD_SECONDS

    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    server = QdrantClient(location=":memory:")
    now = time.time()
    stale = _crashed_build(server, "site-a", now - STALE_BUILD_SECONDS - 60, retriever.dim)
    live = _crashed_build(server, "site-a", now - 60, retriever.dim)
    store = KnowledgeStore(server, "site-a")  # exclusive=False: a server's store
    assert store.build("fp2", lambda: chunk_documents(client.corpus(), retriever.tokenizer,
                       32, 4), retriever.encode_contexts, retriever.dim, progress=False)  # fmt: skip
    names = {c.name for c in server.get_collections().collections}
    assert stale not in names and live in names and len(names) == 2
    # the next check of an up-to-date store prunes too, without rebuilding
    assert store.build("fp2", lambda: [], retriever.encode_contexts, retriever.dim) is False


def test_edge_store_answers_as_the_embedded_one_and_publishes_only_complete_builds(
    tiny_settings, toy_root
):
    """store-mode=edge (Qdrant's Rust engine): the same chunks, order and scores as
    qdrant-client's local mode, one process per folder, interrupted builds never published."""
    from fedrag_app.rag.edge_store import EdgeStore  # make setup installs the [edge] extra

    client = resolve_clients([toy_root / "client-a"])[0]
    retriever = build_retriever(tiny_settings)
    queries = retriever.encode_queries(["ASCII", "TCP", "Unix"])
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        expected = store.search(queries, 4, with_vectors=True)
    edge = tiny_settings.replace(store_mode="edge")
    with open_store(client, edge, retriever, progress=False) as store:
        assert isinstance(store, EdgeStore) and store.count() == 6
        first = store.published()
        got = store.search(queries, 4, with_vectors=True)
        for want, have in zip(expected, got, strict=True):
            assert [h.id for h in have] == [h.id for h in want]
            assert [h.text for h in have] == [h.text for h in want]
            assert [h.score for h in have] == pytest.approx([h.score for h in want], abs=1e-5)
            assert all(h.vector.shape == (retriever.dim,) for h in have)
        with pytest.raises(RuntimeError, match="another process"):
            KnowledgeStore.open("client-a", "edge", tiny_settings.store_dir)
    with open_store(client, edge, retriever, progress=False) as store:
        assert store.published() == first  # same corpus + encoder: reused
        with pytest.raises(KeyboardInterrupt):  # a build that dies halfway

            def failing_embed(texts):
                raise KeyboardInterrupt

            store.build("other", lambda: chunk_documents(client.corpus(), retriever.tokenizer,
                        32, 4), failing_embed, retriever.dim, progress=False)  # fmt: skip
        assert store.published() == first and not store.is_current("other")
        assert len(store.search(queries[:1], 2)[0]) == 2  # the old build still answers
    folder = store.folder
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2  # the crashed build is left...
    with open_store(client, tiny_settings.replace(store_mode="edge", chunk_tokens=16), retriever,
                    progress=False) as store:  # fmt: skip
        assert store.published() != first  # changed chunking: rebuilt
        assert [p.name for p in folder.iterdir() if p.is_dir()] == [store.published()]  # ...pruned
