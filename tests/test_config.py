import tomllib
from pathlib import Path

import pytest

from fedrag_app.config import Settings, parse_overrides, settings_from

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_config_matches_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == Settings().to_config()


def test_overrides_are_typed_and_unknown_keys_named():
    s = settings_from(parse_overrides(["top-k=5 device=cuda autocast-bf16=true gen-lr=1e-3"]))
    assert (s.top_k, s.device, s.autocast_bf16, s.gen_lr) == (5, "cuda", True, 1e-3)
    with pytest.raises(ValueError, match="unknown config key 'top_k'"):
        parse_overrides(["top_k=5"])
    with pytest.raises(ValueError, match="'top-k': expected int"):
        settings_from({"top-k": "many"})
    with pytest.raises(ValueError, match="'mode' = 'all'"):
        settings_from({"mode": "all"})


def test_flower_keys_are_ignored_and_message_config_wins():
    s = settings_from({"server-round": 3, "proximal-mu": 0.5})
    assert s.proximal_mu == 0.5


def test_site_settings_layer_run_message_and_node_config():
    from fedrag_app.task import site_settings

    run = {"store-dir": "/run/stores", "proximal-mu": 0.0, "top-k": 5}
    s = site_settings(run, {"proximal-mu": 0.1}, {"store-path": "/site/stores"})
    assert (s.store_dir, s.proximal_mu, s.top_k, s.store_mode) == (
        "/site/stores", 0.1, 5, "embedded",
    )  # fmt: skip
    # a site with its own Qdrant server: the URL alone switches that site to server mode
    s = site_settings(run, {}, {"qdrant-url": "https://q.site-a:6333"})
    assert (s.store_mode, s.qdrant_url) == ("server", "https://q.site-a:6333")
    s = site_settings(
        run, {}, {"qdrant-url": "u", "store-mode": "memory", "qdrant-api-key-env": "K"}
    )
    assert (s.store_mode, s.qdrant_api_key_env) == ("memory", "K")


def test_node_without_data_path_or_partition_is_named():
    from fedrag_app.task import node_client

    with pytest.raises(ValueError, match="data-path"):
        node_client({}, Settings())
