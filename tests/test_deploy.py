"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, 2 registered
SuperNodes with their own data and stores, 1 unregistered SuperNode (slow: ~2 min)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_simulation import CANARY, files_with, plant_canary

from fedrag_app.deploy_local import DEPLOY, deploy_local, superlink_command, supernode_command

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_tls_and_supernode_auth_on_loopback(tiny_models, toy_root, tmp_path):
    config = {
        "retriever-model": tiny_models["retriever"], "generator-model": tiny_models["generator"],
        "output-dir": str(tmp_path / "runs"), "chunk-tokens": 32, "chunk-overlap": 4,
        "top-k": 2, "lsr-k": 3, "local-steps": 1, "batch-size": 2, "max-new-tokens": 4,
        "eval-limit": 2, "num-server-rounds": 2, "min-nodes": 2, "round-timeout": 300,
        "max-seq-len": 320, "query-question": "What does the canary protocol stand for?",
        "keep-optimizer-state": True,  # (the default) its carry-over across processes is checked
    }  # fmt: skip
    data = tmp_path / "data"
    folders = [data / "client-a", data / "client-b"]
    for src, dst in zip((toy_root / "client-a", toy_root / "client-b"), folders, strict=True):
        shutil.copytree(src, dst)
    plant_canary(folders[0])  # site-0's private fact
    # site-1 allows federated query (at most 1 chunk); site-0 keeps the default: refuse
    options = {"site-1": {"allow-federated-query": True, "max-query-k": 1}}
    result = deploy_local(
        folders, config, tmp_path / "deploy", unregistered_extra=True, timeout=600,
        site_options=options,
    )  # fmt: skip
    logs = tmp_path / "deploy" / "logs"
    assert result.ok, f"{result.status}\n" + (logs / "flwr-run.log").read_text()[-3000:]

    # TLS everywhere: no process was started with --insecure (their real command lines)
    assert result.commands and not any("--insecure" in c for c in result.commands)
    assert sum(c[0] == "flower-supernode" for c in result.commands) == 3
    # the CA's private key is not in the certificate folder a SuperLink container mounts
    assert not (tmp_path / "deploy" / "certs" / "ca.key").exists()
    assert (tmp_path / "deploy" / "certs.ca-private" / "ca.key").exists()

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

    # federated query: site-0 refused (its own log says so), site-1 shared one chunk
    stores = tmp_path / "deploy" / "stores"
    assert "refused: federated-query" in (stores / "site-0" / "client-a.site.log").read_text()
    assert "shared 1 chunk texts" in (stores / "site-1" / "client-b.site.log").read_text()
    # the canary is in site-0's data and store folders only: not in any SuperNode, SuperLink or
    # run log, the SuperLink's database, the run folder, or the other site's folders
    allowed = [folders[0], stores / "site-0"]
    assert files_with(tmp_path, CANARY, allowed) == []

    # every process is gone
    assert result.port > 0 and len(result.pids) == 4  # SuperLink + 2 sites + intruder
    assert _alive(result.pids, str(tmp_path / "deploy"), f"127.0.0.1:{result.port}") == []


def _flags(command: list[str] | str) -> set[str]:
    words = command.split() if isinstance(command, str) else command
    return {w for w in words if w.startswith("--")}


def test_the_readmes_deployment_commands_are_the_ones_the_loopback_test_runs():
    """Same programs with the same flags as deploy_local (values differ: hosts, paths, ports)."""
    for doc in (ROOT / "README.md", DEPLOY / "README.md"):
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
        lines = [ln.strip() for ln in text.splitlines()]
        superlinks = [ln for ln in lines if ln.startswith("flower-superlink ")]
        supernodes = [ln for ln in lines if ln.startswith("flower-supernode ")]
        assert superlinks and supernodes, doc
        want_link = _flags(superlink_command(Path("c"), "h", 1, Path("d")))
        want_node = _flags(supernode_command("h:1", Path("ca"), Path("k"), 2, "x"))
        assert all(_flags(ln) == want_link for ln in superlinks), (doc, superlinks)
        assert all(_flags(ln) == want_node for ln in supernodes), (doc, supernodes)


def test_the_image_installs_the_versions_the_tests_ran_with():
    from importlib.metadata import version

    pins = dict(
        line.split("==", 1)
        for line in (DEPLOY / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {k.lower(): v for k, v in pins.items()}
    for pkg in (
        "flwr",
        "torch",
        "transformers",
        "peft",
        "sentence-transformers",
        "qdrant-client",
        "qdrant-edge-py",
    ):  # store-mode=edge is a site option: the image has it
        assert pins[pkg] == version(pkg).split("+")[0], pkg
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "-c deploy/constraints.txt" in dockerfile and "\nUSER fedrag" in dockerfile


def test_key_and_certificate_scripts_never_replace_what_exists(tmp_path):
    """A site's registered key or the CA every SuperNode trusts must not be replaced silently."""
    keys = tmp_path / "keys"
    subprocess.run(["bash", str(DEPLOY / "supernode_keys.sh"), str(keys), "site"], check=True)
    key = (keys / "site").read_bytes()
    again = subprocess.run(["bash", str(DEPLOY / "supernode_keys.sh"), str(keys), "site"],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 1 and "refusing" in again.stderr
    assert (keys / "site").read_bytes() == key
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(certs), "127.0.0.1"], check=True)
    ca = (certs / "ca.crt").read_bytes()
    again = subprocess.run(["bash", str(DEPLOY / "certs.sh"), str(certs), "127.0.0.1"],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 1 and "refusing" in again.stderr
    assert (certs / "ca.crt").read_bytes() == ca


def test_deploy_local_refuses_a_workdir_it_did_not_make(tmp_path):
    from fedrag_app.deploy_local import _claim

    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a previous deploy-local"):
        _claim(tmp_path)
    _claim(tmp_path / "new")
    _claim(tmp_path / "new")  # its own: reused
