"""Launch a real deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, one
SuperNode per data folder (each with its own store), run the app, stop everything by PID.

    python -m fedrag_app.deploy_local --data DIR --data DIR [--unregistered-extra] [-c 'k=v ...']

It runs the same commands as deploy/README.md: deploy/certs.sh, deploy/supernode_keys.sh,
flower-superlink, flwr supernode register, flower-supernode, flwr run, flwr list.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedrag_app.simulation import APP_DIR, free_port, latest_run, toml_value

DEPLOY = APP_DIR / "deploy"
MARKER = ".fedrag-deploy-local"  # marks a workdir this command made, so a re-run may reuse it


def _claim(workdir: Path) -> None:
    """Use ``workdir`` only if it is new, empty or a previous deploy-local's: its certs, keys and
    SuperLink database are replaced on every run, so nothing else may live there."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise SystemExit(
            f"--workdir {workdir}: not empty and not a previous deploy-local ({MARKER}); refusing"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()


CONNECTION = "local-tls"


@dataclass
class DeployResult:
    status: str
    run_id: str
    workdir: Path
    pids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    port: int = 0
    commands: list[list[str]] = field(default_factory=list)  # every process started, as run

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class Processes:
    """Every process started here, each in its own session so its children stop with it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs if p.poll() is None]
            for p in alive:
                try:
                    os.killpg(p.pid, sig)  # the process and the runtimes it spawned
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while any(p.poll() is None for p in alive) and time.time() < deadline:
                time.sleep(0.1)
        groups = set()
        for p in self.procs:  # runtimes still in a group whose leader has exited
            try:
                os.killpg(p.pid, signal.SIGKILL)
                groups.add(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 5.0  # SIGKILL is asynchronous: let them finish exiting
        while groups and time.time() < deadline:
            time.sleep(0.1)
            groups = {g for g in groups if _group_exists(g)}


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    return out.stdout


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def superlink_command(certs: Path, host: str, port: int, database: Path) -> list[str]:
    """The SuperLink of deploy/README.md: TLS, SuperNode authentication, no runtime installs."""
    return [
        "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth", "--host", host, "--port", str(port),
        "--database", str(database), "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def supernode_command(
    superlink: str, ca: Path, key: Path, port: int, node_config: str
) -> list[str]:
    """A site's SuperNode of deploy/README.md: its own key, the CA, its own node config."""
    return [
        "flower-supernode", "--superlink", superlink, "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key), "--port", str(port),
        "--node-config", node_config,
    ]  # fmt: skip


def _node_value(value: object) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f"'{value}'"
        if isinstance(value, str)
        else str(value)
    )


def deploy_local(
    data_folders: list[Path],
    run_config: dict[str, object],
    workdir: Path,
    unregistered_extra: bool = False,
    timeout: float = 900,
    site_options: dict[str, dict[str, object]] | None = None,
) -> DeployResult:
    """Start SuperLink + SuperNodes with TLS and auth, run the app, stop everything.

    Site ``site-i`` serves ``data_folders[i]``; ``site_options["site-i"]`` adds to its node
    config (its site policy, e.g. ``{"allow-federated-query": True}``).
    """
    _claim(workdir)
    certs, keys, logs, home = (workdir / d for d in ("certs", "keys", "logs", "flwr-home"))
    # a loopback run's throwaway identities, made fresh each time (certs.sh and
    # supernode_keys.sh refuse to replace what exists; a real site's keys are never here)
    for d in (certs, keys):
        if d.is_dir():
            shutil.rmtree(d)
    (workdir / "superlink.db").unlink(missing_ok=True)
    for d in (logs, home):
        d.mkdir(exist_ok=True)
    env = _env(home)
    port = free_port()
    _run(["bash", str(DEPLOY / "certs.sh"), str(certs), "127.0.0.1", "localhost"], env)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    procs = Processes(logs)
    start = time.perf_counter()
    status, run_id = "not-started", ""
    try:
        superlink = procs.start(
            "superlink", superlink_command(certs, "127.0.0.1", port, workdir / "superlink.db"), env
        )
        _wait_port(port, superlink)
        sites = [(f"site-{i}", Path(folder)) for i, folder in enumerate(data_folders)]
        if unregistered_extra:
            sites.append(("intruder", Path(data_folders[0])))
        for name, folder in sites:
            _run(["bash", str(DEPLOY / "supernode_keys.sh"), str(keys), name], env)
            if name != "intruder":  # the intruder's key is never registered
                _run(["flwr", "supernode", "register", str(keys / f"{name}.pub"), CONNECTION], env)
            policy = {"data-path": str(folder), "store-path": str(workdir / "stores" / name)}
            policy.update((site_options or {}).get(name, {}))
            node_config = " ".join(f"{k}={_node_value(v)}" for k, v in policy.items())
            procs.start(
                name,
                supernode_command(
                    f"127.0.0.1:{port}", certs / "ca.crt", keys / name, free_port(), node_config
                ),
                env,
            )
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        run = subprocess.run(
            ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", overrides],
            env=env, stdout=open(logs / "flwr-run.log", "w"), stderr=subprocess.STDOUT, timeout=timeout,
        )  # fmt: skip
        del run
        status, run_id = latest_run(env, CONNECTION)
    finally:
        procs.stop_all()
    return DeployResult(
        status,
        run_id,
        workdir,
        [p.pid for p in procs.procs],
        time.perf_counter() - start,
        port,
        [list(map(str, p.args)) for p in procs.procs],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", action="append", required=True, help="one client folder per SuperNode"
    )
    parser.add_argument("--workdir", default="outputs/deploy-local")
    parser.add_argument(
        "--unregistered-extra",
        action="store_true",
        help="also start a SuperNode whose key is not registered",
    )
    parser.add_argument("-c", "--run-config", action="append", default=[])
    args = parser.parse_args(argv)
    from fedrag_app.config import parse_overrides

    config: dict[str, object] = dict(parse_overrides(args.run_config))
    config.setdefault("output-dir", str(Path(args.workdir).resolve() / "runs"))
    result = deploy_local(
        [Path(d).resolve() for d in args.data],
        config,
        Path(args.workdir).resolve(),
        args.unregistered_extra,
    )
    print(
        f"deploy-local: status {result.status} in {result.seconds:.0f} s; logs in {result.workdir / 'logs'}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
