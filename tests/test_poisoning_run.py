"""A real `flwr run` with a hostile site (benchmarks/attack_app.py): its NaN update is dropped,
a robust Flower strategy aggregates the others, and the global model stays finite (slow)."""

import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FACTS, make_client

from fedrag_app.simulation import run_simulation

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "dp_robust.py"


def _bench():
    spec = importlib.util.spec_from_file_location("dp_robust", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Bulyan needs 4f+3 replies: 3 remain once the NaN site is dropped, so it runs with f = 0
@pytest.mark.parametrize(
    ("strategy", "malicious"),
    [("fedmedian", 0), ("fedtrimmedavg", 0), ("krum", 1), ("multikrum", 1), ("bulyan", 0)],
)
def test_a_nan_site_is_rejected_and_a_robust_strategy_aggregates_the_rest(
    strategy, malicious, tiny_models, tmp_path, monkeypatch
):
    root = tmp_path / "data"
    for i in range(4):
        make_client(root / f"site-{i}", FACTS[3 * i : 3 * i + 3])
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
    monkeypatch.setenv("FEDRAG_ATTACK", "nan")
    monkeypatch.setenv("FEDRAG_ATTACK_SITES", "1")
    app = _bench().hostile_app_dir(tmp_path)
    config = {
        "data-root": str(root), "retriever-model": tiny_models["retriever"],
        "generator-model": tiny_models["generator"], "output-dir": str(tmp_path / "out"),
        "chunk-tokens": 32, "chunk-overlap": 4, "top-k": 2, "local-steps": 1, "batch-size": 2,
        "max-new-tokens": 4, "eval-limit": 2, "num-server-rounds": 1, "min-nodes": 4,
        "fraction-evaluate": 0.0, "strategy": strategy, "max-seq-len": 320,
        "num-malicious": malicious, "num-krum-selected": 2, "beta": 0.2,
    }  # fmt: skip
    result = run_simulation(config, num_supernodes=4, app_dir=app, log_file=tmp_path / "run.log",
                            site_policy={"store-path": str(tmp_path / "stores")})  # fmt: skip
    assert result.ok, (tmp_path / "run.log").read_text()[-4000:]
    rows = json.loads((result.run_dir / "history.json").read_text())
    rejected = [r for r in rows if r.get("rejected-non-finite")]
    assert len(rejected) == 1 and rejected[0]["round"] == 1
    agg = next(r for r in rows if r["client"] == "aggregated" and r["stage"] == "train")
    assert agg["rejected-replies"] == 1.0
    initial = np.load(result.run_dir / "initial.npz")
    final = np.load(result.run_dir / "checkpoint" / "arrays.npz")
    assert all(np.isfinite(final[k]).all() for k in final.files)
    assert any(not np.array_equal(initial[k], final[k]) for k in final.files)
