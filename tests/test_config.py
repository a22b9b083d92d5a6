"""Settings declared once (server/settings.py): every field of ServerConfig (and of the scheduler's
and model manager's settings it nests) and of BridgeSettings is a flag and a TOKENWIRE_*
variable, and `tokenwire up` hands every one of them to the processes it starts."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from tokenwire.bridge.config import BridgeSettings
from tokenwire.clients import cli
from tokenwire.server import settings
from tokenwire.server.config import ServerConfig

SPECS = list(settings.walk(ServerConfig))
BRIDGE_SPECS = list(settings.walk(BridgeSettings))


def other_value(spec: settings.Spec):
    """A valid value different from the default, as its flag would give it."""
    default = spec.default_value()
    if spec.choices:
        return next(c for c in spec.choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 1.5
    if isinstance(default, Path):
        return Path("/tmp") / f"tw-{spec.dest}"
    return f"value-of-{spec.dest}"


def subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def test_settings_are_complete_and_distinct() -> None:
    names = [spec.path[-1] for spec in SPECS]
    for expected in ("default_max_tokens", "max_request_bytes", "max_batch", "prefix_cache_bytes", "keep_alive_s",
                     "max_loaded", "memory_budget_bytes", "max_message_bytes", "database", "models_dir"):
        assert expected in names, f"{expected} is not a setting"
    for specs in (SPECS, BRIDGE_SPECS):
        assert len({s.flag for s in specs}) == len(specs), "two settings share a flag"
        assert len({s.env for s in specs}) == len(specs), "two settings share an environment variable"
        assert all(s.env.startswith("TOKENWIRE_") and s.help for s in specs)


@pytest.mark.parametrize("spec", SPECS, ids=[s.flag for s in SPECS])
def test_each_server_setting_is_a_flag_and_a_variable(spec: settings.Spec, monkeypatch) -> None:
    value = other_value(spec)
    args = subparser("serve").parse_args([spec.flag, settings.format_value(value)])
    assert settings.value_of(settings.from_namespace(ServerConfig, args), spec) == value
    monkeypatch.setenv(spec.env, settings.format_value(value))
    from_env = settings.from_namespace(ServerConfig, subparser("serve").parse_args([]))
    assert settings.value_of(from_env, spec) == value
    # The flag wins over the variable.
    args = subparser("serve").parse_args([spec.flag, settings.format_value(spec.default_value())])
    assert settings.value_of(settings.from_namespace(ServerConfig, args), spec) == spec.default_value()


@pytest.mark.parametrize("spec", BRIDGE_SPECS, ids=[s.flag for s in BRIDGE_SPECS])
def test_each_bridge_setting_is_a_flag_and_a_variable(spec: settings.Spec, monkeypatch) -> None:
    value = other_value(spec)
    args = subparser("bridge").parse_args([spec.flag, settings.format_value(value)])
    assert settings.value_of(settings.from_namespace(BridgeSettings, args), spec) == value
    monkeypatch.setenv(spec.env, settings.format_value(value))
    assert settings.value_of(settings.environment(BridgeSettings), spec) == value


def test_a_bad_variable_is_named_in_the_error(monkeypatch) -> None:
    monkeypatch.setenv("TOKENWIRE_MEMORY_BUDGET_BYTES", "lots")
    with pytest.raises(ValueError, match="TOKENWIRE_MEMORY_BUDGET_BYTES"):
        settings.environment(ServerConfig)


def test_up_passes_every_setting_to_its_children(monkeypatch) -> None:
    """`tokenwire up` with every setting changed: the server it starts gets each one (it once
    dropped --default-max-tokens and --max-request-bytes), the bridge gets its own and the
    server's address."""
    argv = ["up"]
    expected_server = ServerConfig()
    for spec in SPECS:
        value = other_value(spec)
        argv += [spec.flag, settings.format_value(value)]
        settings._set(expected_server, spec.path, value)
    expected_bridge = BridgeSettings()
    bridge_own = [s for s in BRIDGE_SPECS if s.flag not in cli.UP_SHARED]
    for spec in bridge_own:
        value = other_value(spec)
        argv += [spec.flag, settings.format_value(value)]
        settings._set(expected_bridge, spec.path, value)

    started: list[list[str]] = []

    class Child:
        def __init__(self, args: list[str], **options) -> None:
            started.append(args)
            assert options.get("start_new_session"), "children get sessions of their own (up forwards signals)"

        def poll(self) -> int:
            return 0

        def terminate(self) -> None: ...

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr(cli, "_wait_for_server", lambda target, timeout, ca=None: True)
    args = cli.build_parser().parse_args(argv)
    assert args.func(args) == 0
    server_argv, bridge_argv = (a[a.index("tokenwire.clients.cli") + 1:] for a in started)
    assert server_argv[0] == "serve" and bridge_argv[0] == "bridge"
    got_server = settings.from_namespace(ServerConfig, subparser("serve").parse_args(server_argv[1:]))
    assert got_server == expected_server
    got_bridge = settings.from_namespace(BridgeSettings, subparser("bridge").parse_args(bridge_argv[1:]))
    expected_bridge.grpc_target = expected_server.address
    expected_bridge.server_metrics_url = f"http://{expected_server.host}:{expected_server.metrics_port}/metrics"
    expected_bridge.allowed_hosts = expected_server.allowed_hosts
    expected_bridge.tls_ca = expected_server.tls_cert
    expected_bridge.metrics_token = expected_server.metrics_token
    assert got_bridge == expected_bridge


def test_a_yes_no_setting_is_a_switch() -> None:
    def parsed(*argv: str) -> ServerConfig:
        return settings.from_namespace(ServerConfig, subparser("serve").parse_args(list(argv)))

    assert parsed().insecure_open is False
    assert parsed("--insecure-open").insecure_open is True
    assert parsed("--insecure-open", "false").insecure_open is False
    with pytest.raises(SystemExit):
        subparser("serve").parse_args(["--insecure-open", "maybe"])
