"""Reading a run's status from the Flower CLI, the way the launchers do it."""

from fedrag_app.simulation import _pids_using, flower_env, latest_run, stop_local_superlink


def test_run_status_is_read_even_where_colour_is_forced(tmp_path):
    """Jupyter kernels export FORCE_COLOR=1; the CLI's JSON must still parse. The managed local
    SuperLink that `flwr list` starts is stopped by PID afterwards."""
    env = flower_env(tmp_path / "flwr-home")
    env.update(FORCE_COLOR="1", CLICOLOR_FORCE="1")
    try:
        assert latest_run(env) == ("no-run", "")
    finally:
        stop_local_superlink(env)
    ports = ("FLWR_LOCAL_CONTROL_API_PORT", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT")
    assert all(not _pids_using(int(env[p])) for p in ports)
