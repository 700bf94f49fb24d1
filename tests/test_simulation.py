"""A real `flwr run` on Flower's local simulation engine, with tiny models (slow: ~2-3 min)."""

import json
import shutil

import numpy as np
import pytest

from fedrag_app.config import Settings
from fedrag_app.simulation import run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim_root(toy_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-data")
    for name in ("client-a", "client-b"):
        shutil.copytree(toy_root / name, root / name)
    broken = root / "client-c"
    shutil.copytree(toy_root / "client-a", broken)
    (broken / "train.jsonl").write_text('{"question": "q", "answers": ["a"]}\n{"question": oops}\n')
    return root


def _config(tiny_models, sim_root, tmp_path, **extra):
    config = {
        "data-root": str(sim_root),
        "retriever-model": tiny_models["retriever"],
        "generator-model": tiny_models["generator"],
        "store-dir": str(tmp_path / "stores"),
        "output-dir": str(tmp_path / "out"),
        "chunk-tokens": 32, "chunk-overlap": 4, "top-k": 2, "lsr-k": 3,
        "local-steps": 2, "batch-size": 2, "max-new-tokens": 4, "eval-limit": 3,
        "num-server-rounds": 2, "min-nodes": 2, "mode": "both",
    }  # fmt: skip
    config.update(extra)
    return config


def test_flwr_run_two_rounds_then_resume(tiny_models, sim_root, tmp_path):
    config = _config(tiny_models, sim_root, tmp_path)
    result = run_simulation(config, num_supernodes=3, log_file=tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    assert result.ok, f"status {result.status}\n{log[-4000:]}"
    run = result.run_dir
    assert run is not None and (run / "final" / "adapter" / "adapter_config.json").exists()
    assert (run / "final" / "retriever" / "modules.json").exists()
    initial, final = np.load(run / "initial.npz"), np.load(run / "checkpoint" / "arrays.npz")
    assert set(initial.files) == set(final.files)
    assert {k.split(".")[0] for k in final.files} == {"gen", "ret"}
    assert any(not np.array_equal(initial[k], final[k]) for k in final.files)

    rows = json.loads((run / "history.json").read_text())
    agg_eval = [r for r in rows if r["client"] == "aggregated" and r["stage"] == "evaluate"]
    assert [r["round"] for r in agg_eval] == [0, 1, 2]
    train_rows = [r for r in rows if r["stage"] == "train" and r["client"] != "aggregated"]
    assert sum("error" in r for r in train_rows) == 2  # the broken client, both rounds...
    ok = [r for r in train_rows if "error" not in r]
    assert len(ok) == 4 and all(
        r["bytes-up"] > 0 and "train-loss" in r for r in ok
    )  # ...the rest went on
    defaults = Settings()  # client-lr-scale=linear: 3 clients sampled, so 3x the configured lrs
    assert all(r["gen-lr"] == pytest.approx(3 * defaults.gen_lr) for r in ok)
    assert all(r["ret-lr"] == pytest.approx(3 * defaults.ret_lr) for r in ok)
    # each SuperNode's context.state carried its AdamW moments from round 1 into round 2
    assert sorted(r["gen-optimizer-steps"] for r in ok) == [2, 2, 4, 4]
    assert sorted(r["ret-optimizer-steps"] for r in ok) == [2, 2, 4, 4]
    assert "DataError" in log and "train.jsonl:2" in log
    assert (run / "history.csv").exists() and (run / "history.png").stat().st_size > 0

    resumed = run_simulation(
        _config(tiny_models, sim_root, tmp_path, **{"num-server-rounds": 3, "resume": "last"}),
        num_supernodes=3, log_file=tmp_path / "resume.log",
    )  # fmt: skip
    assert resumed.ok, (tmp_path / "resume.log").read_text()[-4000:]
    rows = json.loads((run / "history.json").read_text())
    agg_eval = [r for r in rows if r["client"] == "aggregated" and r["stage"] == "evaluate"]
    assert [r["round"] for r in agg_eval] == [0, 1, 2, 3]
    assert json.loads((run / "checkpoint" / "round.json").read_text()) == {"round": 3}
