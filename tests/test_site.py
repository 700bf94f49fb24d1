"""The site's trust boundary (fedrag_app/site.py), through the real ClientApp handlers.

What a coordinator controls (run config, message config) cannot change what a site decides;
refusals and failures leave as fixed codes, with the details in the site's own log only.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import write_jsonl
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.metadata import Metadata

from fedrag_app import site, task
from fedrag_app.client_app import evaluate, query, train
from fedrag_app.weights import pack


def _meta(kind: str) -> Metadata:
    return Metadata(run_id=5, message_id="m", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=kind)  # fmt: skip


class Site:
    """One simulated site: partition 0 of a toy data root, with its own store folder."""

    def __init__(self, tiny_settings, root, tmp_path, mode="generator", **node):
        self.s = tiny_settings.replace(mode=mode)
        self.store = tmp_path / "site-a-stores"
        self.node = {"partition-id": 0, "num-partitions": 2, "store-path": str(self.store), **node}
        self.run = {**self.s.to_config(), "data-root": str(root)}
        self.context = Context(run_id=5, node_id=1, node_config=self.node, state=RecordDict(),
                               run_config=self.run)  # fmt: skip
        retriever, generator = task.load_models(self.s, cache_key=5)
        self.fingerprint = task.base_fingerprint(retriever, generator)
        self.arrays = pack(task.trainable_states(self.s.mode, retriever, generator))

    def send(self, handler, kind="train", **config) -> Message:
        config = {"server-round": 1, "base-fingerprint": self.fingerprint, **config}
        content = RecordDict({"arrays": self.arrays, "config": ConfigRecord(config)})
        return handler(Message(content=content, metadata=_meta(kind)), self.context)

    @property
    def log(self) -> str:
        path = self.store / "client-a.site.log"
        return path.read_text() if path.exists() else ""


def _code(reply: Message) -> str:
    assert reply.has_error(), "expected an error reply"
    return reply.error.reason


# ---- the site policy: only the site's node config decides -----------------------------------
POLICY_VALUES = {
    "data-path": "/elsewhere/data", "site-id": "coordinator-picked", "store-path": "/coordinator/stores", "store-mode": "server",
    "qdrant-url": "http://coordinator.example:6333", "qdrant-api-key-env": "AWS_SECRET_ACCESS_KEY",
    "allow-federated-query": True, "max-query-k": 10_000, "allow-full-retriever": True,
    "log-path": "/coordinator/log", "site-policy": "/coordinator/policy.toml",
    "store-dir": "/coordinator/stores", "federated-query": True, "partition-id": 1,
    "num-partitions": 1, "max-epsilon": 1e9, "max-delta": 0.5,
}  # fmt: skip


def test_every_policy_key_has_a_coordinator_value_to_try():
    assert set(POLICY_VALUES) == site.SITE_KEYS


@pytest.mark.parametrize("where", ["run", "message"])
@pytest.mark.parametrize("key", sorted(POLICY_VALUES))
def test_a_coordinator_cannot_set_a_site_policy_key(tiny_settings, toy_root, tmp_path, key, where):
    here = Site(tiny_settings, toy_root, tmp_path)
    if where == "run":
        here.context.run_config[key] = POLICY_VALUES[key]
        reply = here.send(train)
    else:
        reply = here.send(train, **{key: POLICY_VALUES[key]})
    assert _code(reply) == f"refused: {key}"  # the key's name, nothing else
    assert f"replied with error 'refused: {key}'" in here.log and "only this site" in here.log
    # nothing happened: no store was opened or built, here or where the coordinator pointed
    assert not any(here.store.glob("client-a"))
    assert not (tmp_path / "coordinator").exists()


def test_the_node_config_and_policy_file_decide_with_per_site_tables(tmp_path, monkeypatch):
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        'store-path = "/all"\nallow-federated-query = true\n\n'
        '[sites.client-a]\nmax-query-k = 2\nqdrant-url = "http://q.a:6333"\nsite-id = "a"\n'
    )
    p = site.load_policy({"site-policy": str(policy_file)}, "client-a")
    assert (p.store_path, p.allow_federated_query, p.max_query_k) == ("/all", True, 2)
    assert (p.store_mode, p.qdrant_url) == ("server", "http://q.a:6333")  # a URL alone: server
    other = site.load_policy({"site-policy": str(policy_file), "max-query-k": "3"}, "client-b")
    assert (other.max_query_k, other.store_mode) == (3, "embedded")  # node config wins
    monkeypatch.setenv(site.POLICY_ENV, str(policy_file))  # simulation's stand-in
    assert site.load_policy({}, "client-a").max_query_k == 2
    monkeypatch.delenv(site.POLICY_ENV)
    default = site.load_policy({}, "client-a")
    assert not default.allow_federated_query and not default.allow_full_retriever
    assert default.store_mode == "embedded"
    with pytest.raises(ValueError, match="'site-id' is required with a Qdrant server"):
        site.load_policy({"qdrant-url": "http://q.b:6333"}, "client-b")  # would be named 'data'
    typo = tmp_path / "typo.toml"
    typo.write_text("allow-everything = true\n")
    with pytest.raises(ValueError, match="typo.toml: unknown site policy key 'allow-everything'"):
        site.load_policy({"site-policy": str(typo)}, "x")
    bad = tmp_path / "bad.toml"
    bad.write_text("max-query-k = 'many'\n")
    with pytest.raises(ValueError, match="'max-query-k': expected int"):
        site.load_policy({"site-policy": str(bad)}, "x")


def test_the_store_settings_come_from_the_site_only(tiny_settings):
    policy = site.SitePolicy(store_path="/site/stores", qdrant_url="", store_mode="memory")
    s = site.site_settings({"top-k": 5}, {"proximal-mu": 0.1}, policy)
    assert (s.store_dir, s.store_mode, s.top_k, s.proximal_mu) == ("/site/stores", "memory", 5, 0.1)


# ---- federated query: off unless the site allows it; k capped by the site --------------------
def test_federated_query_is_refused_unless_the_site_allows_it(tiny_settings, toy_root, tmp_path):
    here = Site(tiny_settings, toy_root, tmp_path)
    reply = here.send(query, "query", question="What does TCP stand for?", k=2)
    assert _code(reply) == "refused: federated-query"
    assert "allow-federated-query" in here.log

    allowed = Site(tiny_settings, toy_root, tmp_path, **{"allow-federated-query": True,
                                                         "max-query-k": 3})  # fmt: skip
    hits = allowed.send(query, "query", question="What does TCP stand for?", k=10_000)
    texts = list(hits.content["hits"]["texts"])
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)  # capped at 3
    assert list(hits.content["hits"]["scores"]) == sorted(hits.content["hits"]["scores"])[::-1]


# ---- nothing private in errors -----------------------------------------------------------------
CANARY = "ZQX-canary-7f3a"


def test_a_data_error_leaves_as_a_code_and_its_details_stay_in_the_site_log(
    tiny_settings, toy_root, tmp_path
):
    root = tmp_path / "root"
    shutil.copytree(toy_root, root)
    (root / "client-a" / "train.jsonl").write_text(
        json.dumps({"question": f"What is {CANARY}?", "answers": ["x"]}) + "\n"
        + f'{{"question": "{CANARY}", "answers": [{CANARY}]}}\n'
    )  # fmt: skip
    here = Site(tiny_settings, root, tmp_path)
    reply = here.send(train)
    assert _code(reply) == "data-error" and reply.error.code == site.CODES["data-error"]
    assert CANARY not in str(reply.error.reason)
    assert "train.jsonl:2" in here.log  # the site sees where, the server does not


def test_an_example_longer_than_max_seq_len_is_skipped_and_counted(
    tiny_settings, toy_root, tmp_path
):
    root = tmp_path / "root"
    shutil.copytree(toy_root, root)
    pairs = [
        json.loads(line) for line in (root / "client-a" / "train.jsonl").read_text().splitlines()
    ]
    pairs.append({"question": " ".join([CANARY] * 400), "answers": ["far too long"]})
    write_jsonl(root / "client-a" / "train.jsonl", pairs)
    for mode in ("generator", "both"):
        here = Site(tiny_settings, root, tmp_path, mode=mode)
        here.context.run_config["max-seq-len"] = 256
        reply = here.send(train)
        assert not reply.has_error(), here.log
        metrics = reply.content["metrics"]
        assert (
            metrics["skipped-examples"] >= 1 and metrics["gen-steps"] == tiny_settings.local_steps
        )
        assert "do not fit max-seq-len 256 and were skipped" in here.log
        assert CANARY not in here.log


def test_a_site_whose_base_model_differs_refuses_with_model_mismatch(
    tiny_settings, toy_root, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-lm"  # the same architecture and name, other weights
    model = AutoModelForCausalLM.from_pretrained(tiny_settings.generator_model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_settings.generator_model).save_pretrained(other)
    server_side = Site(tiny_settings, toy_root, tmp_path)  # the coordinator's resolved copy
    here = Site(tiny_settings.replace(generator_model=str(other)), toy_root, tmp_path)
    assert here.fingerprint != server_side.fingerprint
    reply = here.send(train, **{"base-fingerprint": server_side.fingerprint})
    assert _code(reply) == "model-mismatch"
    assert str(other) in here.log and "base models differ" in here.log
    reply = here.send(evaluate, "evaluate", **{"base-fingerprint": ""})
    assert _code(reply) == "model-mismatch"
    assert not here.send(evaluate, "evaluate").has_error()  # its own fingerprint: accepted


# ---- retriever updates reveal no token set ------------------------------------------------------
def test_an_lsr_round_with_defaults_sends_no_embedding_rows(tiny_settings, toy_root, tmp_path):
    here = Site(tiny_settings, toy_root, tmp_path, mode="retriever")
    reply = here.send(train)
    assert not reply.has_error(), here.log
    arrays: ArrayRecord = reply.content["arrays"]
    assert arrays and all("lora_" in k for k in arrays)  # LoRA adapters on attention only
    assert not any("embeddings" in k for k in arrays)
    sent = dict(here.arrays)
    assert any(not np.array_equal(arrays[k].numpy(), sent[k].numpy()) for k in arrays)

    # sending a fully trained query encoder is the site's choice, never the coordinator's
    here.context.run_config["retriever-lora-r"] = 0
    assert _code(here.send(train)) == "refused: retriever-lora-r"
    assert "allow-full-retriever" in here.log


def test_a_broken_site_policy_is_a_policy_error_explained_in_the_default_site_log(
    tiny_settings, toy_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("FEDRAG_STORE_DIR", str(tmp_path / "default-stores"))
    bad = tmp_path / "policy.toml"
    bad.write_text("max-query-k = 'many'\n")
    here = Site(tiny_settings, toy_root, tmp_path, **{"site-policy": str(bad)})
    reply = here.send(train)
    assert _code(reply) == "policy-error" and str(bad) not in reply.error.reason
    log = (tmp_path / "default-stores" / "site-policy-error.site.log").read_text()
    assert str(bad) in log and "'max-query-k': expected int" in log
