"""A real `flwr run` on Flower's local simulation engine, with tiny models (slow: ~3 min).

One site's corpus, questions and answers carry a canary string, and so does the broken line of
a failing site; the run trains, evaluates, survives the failing site and asks every site for a
federated query, which each site's default policy refuses. The canary must then appear in no
reply, no log of the run, no file of Flower's or Ray's, only in those two sites' own folders.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedrag_app.cli import main as cli_main
from fedrag_app.config import Settings
from fedrag_app.simulation import run_simulation
from fedrag_app.site import CODES

pytestmark = pytest.mark.slow
CANARY = "QQ-canary-5d1e"


def plant_canary(folder: Path) -> None:
    """A fact only this site knows, in its corpus, a training question and its answer."""
    corpus = folder / "corpus.jsonl"
    corpus.write_text(
        corpus.read_text()
        + json.dumps(
            {"id": "canary", "text": f"The {CANARY} protocol stands for {CANARY} Transfer."}
        )
        + "\n"
    )
    train = folder / "train.jsonl"
    train.write_text(
        train.read_text()
        + json.dumps(
            {"question": f"What does {CANARY} stand for?", "answers": [f"{CANARY} Transfer"]}
        )
        + "\n"
    )
    train.write_text(train.read_text() + json.dumps(  # too long for max-seq-len: skipped
        {"question": " ".join([CANARY] * 300), "answers": [CANARY]}) + "\n")  # fmt: skip


def files_with(root: Path, needle: str, allowed: list[Path]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(a) for a in allowed):
            try:
                if needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def sim_root(toy_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-data")
    for name in ("client-a", "client-b"):
        shutil.copytree(toy_root / name, root / name)
    plant_canary(root / "client-a")
    broken = root / "client-c"
    shutil.copytree(toy_root / "client-a", broken)
    (broken / "train.jsonl").write_text(
        '{"question": "q", "answers": ["a"]}\n{"question": "' + CANARY + '", oops}\n'
    )
    return root


def _config(tiny_models, sim_root, tmp_path, **extra):
    config = {
        "data-root": str(sim_root),
        "retriever-model": tiny_models["retriever"],
        "generator-model": tiny_models["generator"],
        "output-dir": str(tmp_path / "out"),
        "chunk-tokens": 32, "chunk-overlap": 4, "top-k": 2, "lsr-k": 3,
        "local-steps": 8, "batch-size": 2, "max-new-tokens": 4, "eval-limit": 3,
        "num-server-rounds": 2, "min-nodes": 2, "mode": "both", "max-seq-len": 320,
        "query-question": "What does the canary protocol stand for?",
    }  # fmt: skip
    config.update(extra)
    return config


def _policy(tmp_path):
    """The sites' own settings (a deployment's node configs): a and c keep their own stores."""
    return {
        "store-path": str(tmp_path / "stores"),
        "sites": {
            "client-a": {"store-path": str(tmp_path / "site-a")},
            "client-c": {"store-path": str(tmp_path / "site-c")},
        },
    }


def test_flwr_run_two_rounds_then_resume_and_no_canary_leaves_its_site(
    tiny_models, sim_root, tmp_path, monkeypatch
):
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths have a limit
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    home = tmp_path / "flwr-home"
    # kept AdamW moments (the default, set here so the check below survives a change of it)
    config = _config(tiny_models, sim_root, tmp_path, **{"keep-optimizer-state": True})
    result = run_simulation(config, num_supernodes=3, log_file=tmp_path / "run.log",
                            flwr_home=home, site_policy=_policy(tmp_path))  # fmt: skip
    log = (tmp_path / "run.log").read_text()
    assert result.ok, f"status {result.status}\n{log[-4000:]}"
    run = result.run_dir
    assert run is not None and (run / "final" / "adapter" / "adapter_config.json").exists()
    assert (run / "final" / "retriever" / "modules.json").exists()
    initial, final = np.load(run / "initial.npz"), np.load(run / "checkpoint" / "arrays.npz")
    assert set(initial.files) == set(final.files)
    assert {k.split(".")[0] for k in final.files} == {"gen", "ret"}
    assert all("lora_" in k for k in final.files)  # LoRA only: no embedding rows travel
    assert any(not np.array_equal(initial[k], final[k]) for k in final.files)

    rows = json.loads((run / "history.json").read_text())
    agg_eval = [r for r in rows if r["client"] == "aggregated" and r["stage"] == "evaluate"]
    assert [r["round"] for r in agg_eval] == [0, 1, 2]
    train_rows = [r for r in rows if r["stage"] == "train" and r["client"] != "aggregated"]
    errors = [r for r in train_rows if "error" in r]
    assert len(errors) == 2 and all(r["error-code"] == CODES["data-error"] for r in errors)
    ok = [r for r in train_rows if "error" not in r]
    assert len(ok) == 4 and all(r["bytes-up"] > 0 and "train-loss" in r for r in ok)
    # client-a's overlong pair, each round: 1 LSR pair and its 2 RALT examples (top-k=2); a
    # round of 8 steps x batch 2 prepares every pair (a round prepares only what it trains)
    assert sum(r["skipped-examples"] for r in ok) == 6
    defaults = Settings()  # client-lr-scale=linear: 3 clients sampled, so 3x the configured lrs
    assert all(r["gen-lr"] == pytest.approx(3 * defaults.gen_lr) for r in ok)
    assert all(r["ret-lr"] == pytest.approx(3 * defaults.ret_lr) for r in ok)
    # each SuperNode's context.state carried its AdamW moments from round 1 into round 2
    assert sorted(r["gen-optimizer-steps"] for r in ok) == [8, 8, 16, 16]
    assert sorted(r["ret-optimizer-steps"] for r in ok) == [8, 8, 16, 16]
    assert (run / "history.csv").exists() and (run / "history.png").stat().st_size > 0

    # what a user does next: a report of the run and an export for serving (both canary-checked)
    assert cli_main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    for n in (0, 1, 2):  # every round, in the table of replies
        assert f"<tr><td>{n}</td><td>evaluate</td><td>aggregated</td>" in page
    for n in (1, 2):
        assert f"<tr><td>{n}</td><td>train</td><td>aggregated</td>" in page
    assert page.count("data:image/png;base64,") == 2 and 'src="http' not in page
    assert "failed (code" in page and "Base against final" in page
    assert cli_main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "federated: 2 rounds of fedavg" in card and "| overall |" in card

    # the sites' own logs have the details; the server's log only codes
    site_a, site_c = tmp_path / "site-a", tmp_path / "site-c"
    assert "train.jsonl:2" in (site_c / "client-c.site.log").read_text()
    assert "refused: federated-query" in (site_a / "client-a.site.log").read_text()
    assert "do not fit max-seq-len" in (site_a / "client-a.site.log").read_text()
    assert "train.jsonl:2" not in log and "DataError" not in log
    assert "federated query" in log  # it was asked, and answered from no site's text
    # the canary: nowhere but the two sites' data and store folders (flwr home, the SuperLink's
    # database, the run folder and log, Ray's session logs, the shared store folder included)
    allowed = [sim_root / "client-a", sim_root / "client-c", site_a, site_c]
    assert files_with(tmp_path, CANARY, allowed) == []
    assert files_with(ray_tmp, CANARY, []) == []
    assert CANARY not in json.dumps(rows)

    resumed = run_simulation(
        _config(tiny_models, sim_root, tmp_path, **{"num-server-rounds": 3, "resume": "last"}),
        num_supernodes=3, log_file=tmp_path / "resume.log", site_policy=_policy(tmp_path),
    )  # fmt: skip
    assert resumed.ok, (tmp_path / "resume.log").read_text()[-4000:]
    rows = json.loads((run / "history.json").read_text())
    agg_eval = [r for r in rows if r["client"] == "aggregated" and r["stage"] == "evaluate"]
    assert [r["round"] for r in agg_eval] == [0, 1, 2, 3]
    assert json.loads((run / "checkpoint" / "round.json").read_text()) == {"round": 3}
    shutil.rmtree(ray_tmp, ignore_errors=True)
