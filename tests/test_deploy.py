"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, 2 registered
SuperNodes with their own data and stores, 1 unregistered SuperNode (slow: ~2 min)."""

import json
from pathlib import Path

import pytest

from fedrag_app.deploy_local import deploy_local

pytestmark = pytest.mark.slow


def _alive(sessions: list[int], *needles: str) -> list[str]:
    """Live processes in one of the launcher's sessions (SuperLink, SuperNodes and the
    SuperExec / ClientApp runtimes they spawn) or whose command line names a needle."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = stat[0], int(stat[3])
        if state != "Z" and (session in sessions or any(n in cmd for n in needles)):
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def test_tls_and_supernode_auth_on_loopback(tiny_models, toy_root, tmp_path):
    config = {
        "retriever-model": tiny_models["retriever"], "generator-model": tiny_models["generator"],
        "output-dir": str(tmp_path / "runs"), "chunk-tokens": 32, "chunk-overlap": 4,
        "top-k": 2, "lsr-k": 3, "local-steps": 1, "batch-size": 2, "max-new-tokens": 4,
        "eval-limit": 2, "num-server-rounds": 2, "min-nodes": 2, "round-timeout": 300,
    }  # fmt: skip
    folders = [toy_root / "client-a", toy_root / "client-b"]
    result = deploy_local(
        folders, config, tmp_path / "deploy", unregistered_extra=True, timeout=600
    )
    logs = tmp_path / "deploy" / "logs"
    assert result.ok, f"{result.status}\n" + (logs / "flwr-run.log").read_text()[-3000:]

    # TLS everywhere: no process was started with --insecure
    started = (logs / "superlink.log").read_text()
    assert "--insecure" not in started

    # the two registered sites trained and evaluated; the intruder got no work
    [run] = list((tmp_path / "runs").glob("run-*"))
    rows = json.loads((run / "history.json").read_text())
    trained = {r["client"] for r in rows if r["stage"] == "train" and r["client"] != "aggregated"}
    assert len(trained) == 2 and all("error" not in r for r in rows)
    # a fresh ClientApp process per message, yet each site's AdamW moments carried over
    steps = [
        r["gen-optimizer-steps"]
        for r in rows
        if r["stage"] == "train" and r["client"] != "aggregated"
    ]
    assert sorted(steps) == [1, 1, 2, 2]
    for site in ("site-0", "site-1"):
        assert "Receiving: train message" in (logs / f"{site}.log").read_text()
    intruder = (logs / "intruder.log").read_text()
    assert "Failed to initialize the connection to the SuperLink" in intruder
    assert "Receiving:" not in intruder
    assert (run / "final" / "adapter" / "adapter_config.json").exists()

    # every process is gone
    assert result.port > 0 and len(result.pids) == 4  # SuperLink + 2 sites + intruder
    assert _alive(result.pids, str(tmp_path / "deploy"), f"127.0.0.1:{result.port}") == []
