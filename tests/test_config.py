import tomllib
from pathlib import Path

import pytest

from fedrag_app.config import Settings, parse_overrides, settings_from

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_config_matches_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == Settings().to_config()
    # the coordinator's config names no key that only a site may set (fedrag_app/site.py)
    from fedrag_app.site import SITE_KEYS

    assert not set(config) & SITE_KEYS


def test_overrides_are_typed_and_unknown_keys_named():
    s = settings_from(parse_overrides(["top-k=5 device=cuda autocast-bf16=true gen-lr=1e-3"]))
    assert (s.top_k, s.device, s.autocast_bf16, s.gen_lr) == (5, "cuda", True, 1e-3)
    with pytest.raises(ValueError, match="unknown config key 'top_k'"):
        parse_overrides(["top_k=5"])
    with pytest.raises(ValueError, match="'top-k': expected int"):
        settings_from({"top-k": "many"})
    with pytest.raises(ValueError, match="'mode' = 'all'"):
        settings_from({"mode": "all"})
    with pytest.raises(ValueError, match="'server-lr-schedule' = 'run' needs"):
        settings_from({"server-lr-schedule": "run"})  # FedAvg has no server lr
    with pytest.raises(ValueError, match="'server-beta-2' = 1.0"):
        settings_from({"server-beta-2": 1.0})
    with pytest.raises(ValueError, match="'fednova' = true rescales"):
        settings_from({"fednova": True, "strategy": "fedmedian"})


def test_flower_keys_are_ignored_and_message_config_wins():
    from fedrag_app.site import SitePolicy, site_settings

    s = settings_from({"server-round": 3, "proximal-mu": 0.5})
    assert s.proximal_mu == 0.5
    # a message's config (FedProx's proximal-mu, the scaled lrs) wins over the run config
    s = site_settings({"proximal-mu": 0.0, "gen-lr": 1e-3}, {"proximal-mu": 0.1}, SitePolicy())
    assert (s.proximal_mu, s.gen_lr) == (0.1, 1e-3)


def test_node_without_data_path_or_partition_is_named():
    from fedrag_app.site import SitePolicy, node_client

    with pytest.raises(ValueError, match="data-path"):
        node_client({}, SitePolicy(), Settings())
