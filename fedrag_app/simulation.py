"""Run ``flwr run`` on Flower's local simulation engine the way this machine needs it.

Sets a private FLWR_HOME and free ports (a later ``flwr run`` would otherwise reuse any SuperLink
that answers on the default port), skips the per-run dependency install, streams the logs,
reads the run's real status (``flwr run`` exits 0 even when the ServerApp failed) and stops the
SuperLink it started, by PID, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent


@dataclass
class SimulationResult:
    status: str
    run_id: str
    run_dir: Path | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, ports: tuple[int, int] | None = None) -> dict[str, str]:
    http, control = ports or (free_port(), free_port())
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http),
        FLWR_LOCAL_CONTROL_API_PORT=str(control),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    bindir = str(Path(sys.executable).parent)  # flwr needs flower-superlink on PATH
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _pids_using(port: int) -> list[int]:
    """Processes whose command line names our SuperLink's ports (the SuperLink, its engine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"127.0.0.1:{port}" in cmd and ("superlink" in cmd or "flwr-simulation" in cmd):
            pids.append(int(proc.name))
    return pids


def stop_local_superlink(env: dict[str, str]) -> None:
    ports = [
        int(env["FLWR_LOCAL_CONTROL_API_PORT"]),
        int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]),
    ]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = {p for port in ports for p in _pids_using(port)}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()}
            time.sleep(0.2)
        if not pids:
            return


_COLOUR_VARS = ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS", "TTY_COMPATIBLE")


def latest_run(env: dict[str, str], connection: str | None = None) -> tuple[str, str]:
    """(status, run id) of the newest run, from ``flwr list --format json``.

    The JSON is read with colours off: Jupyter kernels export FORCE_COLOR=1, and the Flower CLI
    then wraps every token of its "JSON" in ANSI escapes.
    """
    plain = {k: v for k, v in env.items() if k not in _COLOUR_VARS}
    plain.update(NO_COLOR="1", TERM="dumb")
    cmd = ["flwr", "list", *([connection] if connection else []), "--format", "json"]
    out = subprocess.run(cmd, env=plain, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(
            f"could not read the run status from `{' '.join(cmd)}` (exit {out.returncode}): "
            f"{(out.stdout + out.stderr)[-1500:]}"
        ) from None
    if not runs:
        return "no-run", ""
    run = max(runs, key=lambda r: r.get("pending-at", ""))
    return run["status"], str(run["run-id"])


def policy_toml(policy: dict[str, object]) -> str:
    """Site policy as TOML: flat keys for every site, ``{"sites": {NAME: {...}}}`` per site."""

    def lines(table: dict[str, object]) -> list[str]:
        return [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]

    out = lines(policy)
    for name, table in dict(policy.get("sites", {})).items():  # type: ignore[arg-type]
        out += ["", f"[sites.{json.dumps(name)}]", *lines(table)]
    return "\n".join(out) + "\n"


def toml_value(v: object) -> str:
    """A TOML value, as Flower's --run-config and a policy file read it."""
    return (
        json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
    )


def run_simulation(
    run_config: dict[str, object],
    num_supernodes: int = 2,
    cpus_per_client: int = 1,
    app_dir: Path = APP_DIR,
    flwr_home: Path | None = None,
    log_file: Path | None = None,
    site_policy: dict[str, object] | None = None,
) -> SimulationResult:
    """Run the app once; ``run_config`` overrides [tool.flwr.app.config] (output-dir made absolute).

    ``site_policy`` stands in for the sites' node configs (one party runs every site here): it is
    written as the policy file ``$FEDRAG_SITE_POLICY`` names (see ``fedrag_app/site.py``).
    """
    config = dict(run_config)
    out_dir = Path(str(config.get("output-dir") or "outputs")).expanduser().resolve()
    config["output-dir"] = str(out_dir)
    before = set(out_dir.glob("run-*")) if out_dir.exists() else set()
    home = Path(flwr_home or tempfile.mkdtemp(prefix="flwr-home-"))
    env = flower_env(home)
    if site_policy:
        home.mkdir(parents=True, exist_ok=True)
        (home / "site-policy.toml").write_text(policy_toml(site_policy))
        env["FEDRAG_SITE_POLICY"] = str(home / "site-policy.toml")
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
    cmd = [
        "flwr", "run", str(app_dir), "--stream",
        "--run-config", overrides,
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        with open(log_file, "w") if log_file else open(os.devnull, "w") as sink:
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                if log_file is None or os.environ.get("FEDRAG_STREAM"):
                    sys.stdout.write(line)
            proc.wait()
        status, run_id = latest_run(env)
    finally:
        stop_local_superlink(env)
        if flwr_home is None:
            shutil.rmtree(home, ignore_errors=True)
    new = sorted(set(out_dir.glob("run-*")) - before) if out_dir.exists() else []
    return SimulationResult(status, run_id, new[-1] if new else None, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="flwr run on the local simulation engine")
    parser.add_argument("--supernodes", type=int, default=0, help="default: one per client")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="'K=V ...'")
    parser.add_argument(
        "-s",
        "--site",
        action="append",
        default=[],
        metavar="'K=V ...'",
        help="site policy for every simulated site, e.g. -s 'store-path=/tmp/stores' "
        "(a deployed site sets these in its --node-config)",
    )
    parser.add_argument("--site-policy", help="a site policy TOML file (see fedrag_app/site.py)")
    args = parser.parse_args(argv)
    from fedrag_app.config import parse_overrides, settings_from
    from fedrag_app.data import resolve_clients

    config: dict[str, object] = dict(parse_overrides(args.run_config))
    s = settings_from(config)
    config = {k: v for k, v in s.to_config().items() if k in config}
    n = args.supernodes or len(resolve_clients([s.data_root] if s.data_root else None))
    policy: dict[str, object] = {}
    for text in args.site:
        for item in shlex.split(text):
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--site {item!r}: expected key=value")
            policy[key] = value
    if args.site_policy:
        os.environ["FEDRAG_SITE_POLICY"] = str(Path(args.site_policy).resolve())
    from fedrag_app.site import load_policy

    load_policy({k: v for k, v in policy.items()})  # a bad key stops here, with its name
    result = run_simulation(
        config, num_supernodes=n, cpus_per_client=args.cpus_per_client, site_policy=policy or None
    )
    print(
        f"fedrag simulate: status {result.status} in {result.seconds:.0f} s; run folder {result.run_dir}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
