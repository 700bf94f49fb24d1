"""Nothing lost: no command deletes what it did not make, runs reproduce, bad values are named
before any model loads, chunk ids cannot collide, the lr factor is bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import inside_a_run
from safetensors.torch import load, load_file

from fedrag_app.centralized import MARKER, OutputExists, run_centralized
from fedrag_app.cli import main
from fedrag_app.config import Settings, settings_from
from fedrag_app.data import Document, resolve_clients


def test_train_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    precious = tmp_path / "outputs"
    precious.mkdir()
    (precious / "run-2026").mkdir()
    (precious / "run-2026" / "history.json").write_text("[]")
    assert main(["train", "--centralized", "--out", str(precious), "--quiet"]) == 2
    assert "is not empty and is not a previous" in capsys.readouterr().err
    assert (precious / "run-2026" / "history.json").read_text() == "[]"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputExists, match="is a file"):
        run_centralized([], Settings(), tmp_path / "a-file")


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "metrics.json"
    }


def test_centralized_runs_reproduce_and_replace_only_their_own_files(
    tiny_settings, toy_root, tmp_path
):
    clients = resolve_clients([toy_root / "client-a"])
    s = tiny_settings.replace(mode="both", ret_lr=5e-2, seed=3)
    out = tmp_path / "out"
    first = run_centralized(clients, s, out, progress=False, evaluate_before=False)
    assert (out / MARKER).exists()
    before = _files(out)
    (tmp_path / "first.safetensors").write_bytes(before["retriever/model.safetensors"])
    (out / "notes.txt").write_text("mine")  # a user's file in a previous result
    second = run_centralized(clients, s, out, progress=False, evaluate_before=False)
    after = _files(out)
    assert after.pop("notes.txt") == b"mine"  # untouched
    # one seed, the same initial LoRA weights: the same adapter and predictions, bit for bit.
    # The query encoder agrees to 1e-4: CPU kernels vary in the last bits of LSR's losses
    # (1e-8 here), which Adam's sign-like first steps at this test's lr 5e-2 carry into weights.
    ret = "retriever/model.safetensors"
    a, b = load_file(out / ".." / "first.safetensors"), load(after.pop(ret))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    before.pop(ret)
    assert after == before
    for key in ("after", "config"):
        assert first[key] == second[key]
    train = {k: v for k, v in first["train"].items() if "seconds" not in k}
    assert train == pytest.approx(
        {k: v for k, v in second["train"].items() if "seconds" not in k}, rel=1e-4
    )
    assert json.loads((out / "metrics.json").read_text())["after"] == second["after"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("k")
    with pytest.raises(OutputExists):
        run_centralized(clients, s.replace(local_steps=0), foreign, progress=False)
    run_centralized(clients, s.replace(local_steps=0), foreign, False, evaluate_before=False,
                    overwrite=True)  # fmt: skip
    assert (foreign / "keep.txt").read_text() == "k" and (foreign / "adapter").is_dir()


def test_chunk_ids_do_not_collide_past_ten_thousand_windows(tiny_settings):
    from transformers import AutoTokenizer

    from fedrag_app.rag.chunking import chunk_documents

    tok = AutoTokenizer.from_pretrained(tiny_settings.retriever_model)
    long = Document("long", " ".join(["word"] * 10_050))
    chunks = chunk_documents([long, Document("short", "a short one")], tok, 2, 1)
    assert len(chunks) > 10_001
    assert len({c.id for c in chunks}) == len(chunks)  # the old d*10_000+w ids collided here
    again = chunk_documents([Document("short", "a short one")], tok, 2, 1)
    # stable: a function of (doc id, window) only
    assert [c.id for c in again] == [c.id for c in chunks if c.doc_id == "short"]


@pytest.mark.parametrize(
    ("key", "value", "span"),
    [("grad-accum", 0, "[1, inf)"), ("lsr-k", 0, "[1, inf)"), ("raft-p", 1.5, "[0, 1]"),
     ("fraction-train", 0.0, "(0, 1]"), ("fraction-evaluate", 1.5, "[0, 1]"),
     ("top-k", 0, "[1, inf)"), ("gen-lr", 0.0, "(0, inf)"), ("client-lr-scale-max", 0.5, "[1, inf)")],
)  # fmt: skip
def test_a_value_out_of_range_is_named_with_its_range(key, value, span):
    with pytest.raises(ValueError) as err:
        settings_from({key: value})
    assert f"config key '{key}' = {value!r}: expected a value in {span}" in str(err.value)


def test_query_and_context_encoders_of_different_dimensions_are_refused(tiny_settings):
    from fedrag_app.rag.models import DEFAULT_RETRIEVER
    from fedrag_app.rag.retriever import Retriever

    with pytest.raises(ValueError, match="'context-model'.*dim 384.*same dimension"):
        Retriever(tiny_settings.retriever_model, context_model=DEFAULT_RETRIEVER)


def test_a_missing_data_folder_is_reported_before_models_load(tmp_path, monkeypatch, capsys):
    from fedrag_app import task

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the data folder was checked")

    monkeypatch.setattr(task, "build_retriever", no_models)
    monkeypatch.setattr(task, "build_generator", no_models)
    for command in (["eval"], ["index"], ["query", "q?"]):
        assert main([*command, "--data", str(tmp_path / "missing"), "--quiet"]) == 2
        assert "missing: not a folder" in capsys.readouterr().err


def test_the_lr_factor_is_capped():
    from flwr.app import ArrayRecord, ConfigRecord

    from fedrag_app.strategies import ClientLrScaling, make_strategy

    class Grid:
        def get_node_ids(self):
            return list(range(1, 21))

    s = Settings(min_nodes=20, gen_lr=1e-3, ret_lr=1e-3)
    strategy = make_strategy(s)
    inside_a_run()
    strategy = ClientLrScaling(strategy, s)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid())
    assert len(messages) == 20
    assert messages[0].content["config"]["gen-lr"] == pytest.approx(4e-3)  # not 20x


def test_contexts_longer_than_max_context_chars_are_counted_and_warned(
    tiny_settings, toy_root, caplog
):
    from fedrag_app import task

    s = tiny_settings.replace(max_context_chars=10)
    retriever, generator = task.build_retriever(s), task.build_generator(s)
    assert generator.max_context_chars == 10
    clients = resolve_clients([toy_root / "client-a"])
    with caplog.at_level("WARNING", logger="fedrag_app.task"):
        task.evaluate_local(clients, s, retriever, generator, progress=False)
    assert "longer than max-context-chars=10 and were cut" in caplog.text
    metrics = task.train_local(clients, s, retriever, generator, progress=False)
    assert metrics["contexts-cut"] > 0
    wide = tiny_settings.replace(max_context_chars=10_000)
    g = task.build_generator(wide)
    assert task.train_local(clients, wide, retriever, g, progress=False)["contexts-cut"] == 0


@pytest.mark.parametrize("crash_at", ["export", "fsync", "rename-current", "rename-tmp", "cleanup"])
def test_a_crash_at_any_step_of_the_checkpoint_swap_resumes_from_the_newest_complete_one(
    tmp_path, monkeypatch, crash_at
):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedrag_app import run_folder
    from fedrag_app.run_folder import RunFolder

    def arrays(v: float) -> ArrayRecord:
        return ArrayRecord({"gen.w": Array(np.full(3, v, dtype=np.float32))})

    older = RunFolder.create(str(tmp_path))  # an older run that resume=last must not pick
    older.save_checkpoint(1, arrays(9.0), lambda folder: None)
    run = RunFolder.create(str(tmp_path))
    run.save_arrays("initial.npz", arrays(0.0))
    run.history.add(1, "evaluate", "aggregated", {"em": 1.0})
    run.save_checkpoint(1, arrays(1.0), lambda folder: None)
    run.history.add(2, "evaluate", "aggregated", {"em": 2.0})

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    renames = []
    real_rename = Path.rename

    def rename(self, target):
        renames.append(self.name)
        if (crash_at, self.name) in {("rename-current", "checkpoint"),
                                     ("rename-tmp", "checkpoint.tmp")}:  # fmt: skip
            raise Crash
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    if crash_at == "fsync":
        monkeypatch.setattr(run_folder, "fsync_tree", crash)
    if crash_at == "cleanup":
        monkeypatch.setattr(run_folder, "fsync_dir", crash)
    export = crash if crash_at == "export" else (lambda folder: None)
    with pytest.raises(Crash):
        run.save_checkpoint(2, arrays(2.0), export)
    monkeypatch.undo()

    resumed = RunFolder.create(str(tmp_path), resume="last")
    assert resumed.path == run.path  # not the older run, whatever state the swap was in
    # complete in checkpoint.tmp from round.json on, which is written only once the rest is
    # durable (fsynced): a power loss cannot leave a "complete" flag over arrays never on disk
    done = {"export": 1, "fsync": 1, "rename-current": 2, "rename-tmp": 2, "cleanup": 2}
    assert resumed.start_round == done[crash_at]
    assert resumed.checkpoint_arrays()["gen.w"].numpy()[0] == float(done[crash_at])
    assert [p.name for p in run.path.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint"]
    # and the next checkpoint goes through
    resumed.save_checkpoint(3, arrays(3.0), lambda folder: None)
    assert RunFolder.create(str(tmp_path), resume="last").start_round == 3


def test_final_exists_only_when_complete(tmp_path):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedrag_app.run_folder import RunFolder

    run = RunFolder.create(str(tmp_path))
    arrays = ArrayRecord({"gen.w": Array(np.ones(3, dtype=np.float32))})

    def half_written(folder, arrays):
        (folder / "adapter").mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run.save_final(arrays, half_written)
    assert not (run.path / "final").exists()
    final = run.save_final(arrays, lambda folder, arrays: (folder / "adapter").mkdir())
    assert (final / "adapter").is_dir() and not (run.path / "final.tmp").exists()


def _fedadam_rounds(wire: str, rounds: int = 3) -> np.ndarray:
    """3 rounds of FedAdam over 2 clients whose updates are 1e-5: far below a float16 step of
    a LayerNorm-like weight near 0.9 (4.9e-4), one element with a zero update."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.app.metadata import Metadata

    from fedrag_app.strategies import Float32Global, make_strategy
    from fedrag_app.weights import pack_reply, unpack

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    strategy = Float32Global(make_strategy(Settings(strategy="fedadam", eta=1e-3)))
    inside_a_run()
    w = np.array([0.9, 0.9, 0.9, 0.5], dtype=np.float32)
    global_ = ArrayRecord({"gen.w": Array(w)})
    for rnd in range(1, rounds + 1):
        strategy.configure_train(rnd, global_, ConfigRecord(), Grid())
        received = unpack(global_)
        replies = []
        for node, step in ((1, 1e-5), (2, 2e-5)):
            trained = received["generator"]["w"] + torch.tensor([step, step, step, 0.0])
            arrays = pack_reply({"generator": {"w": trained}}, received, wire)
            meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                            message_type="train")  # fmt: skip
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
            replies.append(Message(content=content, metadata=meta))
        global_, _ = strategy.aggregate_train(rnd, replies)
        assert global_["gen.w"].numpy().dtype == np.float32  # the server holds float32
    return global_["gen.w"].numpy()


def test_float16_on_the_wire_loses_no_update_and_stays_finite_under_fedadam():
    import numpy as np

    half, full = _fedadam_rounds("float16"), _fedadam_rounds("float32")
    assert np.isfinite(half).all()
    assert np.allclose(half, full, atol=1e-6)  # float16 encodes the 1e-5 updates closely
    assert (half[:3] > 0.9).all()  # the updates were not rounded away
    assert half[3] == pytest.approx(0.5, abs=1e-7)  # a zero update: no 0/0
