"""Configuration layering and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_mesh_config, load_router_config, load_up_config
from shared.errors import ConfigError


def test_env_wins_over_toml_and_flags_win_over_env(tmp_path: Path) -> None:
    toml = tmp_path / "aimesh.toml"
    toml.write_text('[mesh]\nprefix = "fromtoml"\ndrain_timeout_s = 3\n[up]\ntrainer = 4\ninference = 3\n')
    env = {"AIMESH_CONFIG": str(toml), "AIMESH_PREFIX": "fromenv", "AIMESH_UP_INFERENCE": "5"}
    mesh = load_mesh_config(env)
    assert (mesh.prefix, mesh.drain_timeout_s) == ("fromenv", 3.0)
    up = load_up_config(env, overrides={"inference": 7, "router": None})
    assert (up.trainer, up.inference, up.router) == (4, 7, 1)


def test_nats_url_falls_back_to_the_standard_variable() -> None:
    assert load_mesh_config({"NATS_URL": "nats://a:1"}).nats_url == "nats://a:1"
    assert load_mesh_config({"NATS_URL": "nats://a:1", "AIMESH_NATS_URL": "nats://b:2"}).nats_url == "nats://b:2"


def test_a_bad_value_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"AIMESH_ROUTER_PORT: Expected `int`"):
        load_router_config({"AIMESH_ROUTER_PORT": "eighty"})


@pytest.mark.parametrize("value", ["nan", "-0.1", "inf", "11"])
def test_a_hedge_budget_outside_0_to_10_is_refused(value: str) -> None:
    """A NaN budget would compare false with every token count: hedges without bound."""
    with pytest.raises(ConfigError, match="AIMESH_ROUTER_HEDGE_BUDGET"):
        load_router_config({"AIMESH_ROUTER_HEDGE_BUDGET": value})


def test_unknown_toml_keys_are_rejected(tmp_path: Path) -> None:
    toml = tmp_path / "aimesh.toml"
    toml.write_text("[up]\ntrainers = 2\n")
    with pytest.raises(ConfigError, match=r"\[up\] trainers: unknown setting"):
        load_up_config({"AIMESH_CONFIG": str(toml)})


def test_missing_config_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_mesh_config({"AIMESH_CONFIG": "/nonexistent/aimesh.toml"})


def test_list_settings_come_from_json_or_commas() -> None:
    from shared.config import load_router_config

    assert load_router_config({"AIMESH_ROUTER_API_KEYS": '["a:infer", "b:admin"]'}).api_keys == ["a:infer", "b:admin"]
    assert load_router_config({"AIMESH_ROUTER_API_KEYS": "a:infer, b:admin"}).api_keys == ["a:infer", "b:admin"]
