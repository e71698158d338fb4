"""Unit: configuration from flags and environment, and one-line errors naming the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, IceServer, load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    config = load_config([], environ={})
    assert (config.server.host, config.server.port, config.profile) == ("127.0.0.1", 8080, "embedded")
    assert config.server.ice_servers == () and not config.server.loopback_ice and not config.log.json


def test_flags_beat_environment_and_environment_beats_defaults():
    env = {"VOICE_AGENT_PORT": "9000", "VOICE_AGENT_MAX_SESSIONS": "3", "VOICE_AGENT_LOG_JSON": "1",
           "VOICE_AGENT_ICE_SERVER": "stun:stun.example.org:3478;turn:t.example.org:3478,alice,pw"}
    config = load_config(["--port", "9100", "--loopback-ice"], environ=env)
    assert config.server.port == 9100
    assert config.server.max_sessions == 3
    assert config.log.json and config.server.loopback_ice
    assert config.server.ice_servers == (
        IceServer("stun:stun.example.org:3478"),
        IceServer("turn:t.example.org:3478", "alice", "pw"),
    )
    assert config.describe()["server"]["ice_servers"][1]["credential"] == "***"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "http"], "--port"),
        (["--port", "70000"], "--port"),
        (["--max-sessions", "0"], "--max-sessions"),
        (["--profile", "gpt"], "--profile"),
        (["--ice-server", "http://x"], "--ice-server"),
        (["--ice-server", "turn:x.org:3478"], "--ice-server"),
        (["--cert", "/nonexistent.pem", "--key", "/nonexistent.key"], "--cert"),
        (["--ping-timeout-s", "-1"], "--ping-timeout-s"),
    ],
)
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as refused:
        load_config(argv, environ={})
    assert str(refused.value).startswith(flag + ":")


def test_cert_needs_key(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="--cert/--key"):
        load_config(["--cert", str(cert)], environ={})


def test_run_server_fails_at_startup_with_one_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_server.py"), "--port", "nope"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--port" in result.stderr


def test_turn_thresholds_from_flags_and_environment():
    config = load_config(["--commit-ms", "900", "--vad", "webrtc"], environ={"VOICE_AGENT_PAUSE_MS": "300"})
    assert (config.turn.endpointing.commit_ms, config.turn.speculation.pause_ms, config.turn.endpointing.vad) == (900, 300, "webrtc")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--commit-ms", "50"], "--commit-ms"),
        (["--pause-ms", "800"], "--commit-ms"),  # a pause must end before the commit
        (["--threshold", "1.5"], "--threshold"),
        (["--vad", "magic"], "--vad"),
        (["--min-speech-ms", "soon"], "--min-speech-ms"),
    ],
)
def test_bad_turn_thresholds_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as refused:
        load_config(argv, environ={})
    assert str(refused.value).startswith(flag + ":"), str(refused.value)


def test_model_flags_and_environment(tmp_path):
    config = load_config(
        ["--lm", f"hf:{tmp_path}", "--max-new-tokens", "40", "--model-threads", "1"],
        environ={"VOICE_AGENT_SYSTEM_PROMPT": "Be terse.", "VOICE_AGENT_TEMPERATURE": "0.7"},
    )
    models = config.models
    assert models.hf_path == tmp_path and models.max_new_tokens == 40 and models.threads == 1
    assert (models.system_prompt, models.temperature) == ("Be terse.", 0.7)
    assert load_config([], environ={}).models.lm == "embedded"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lm", "gpt-9"], "--lm"),
        (["--lm", "hf:/no/such/dir"], "--lm"),
        (["--lm-url", "ftp://x"], "--lm-url"),
        (["--temperature", "3"], "--temperature"),
        (["--system-prompt", " "], "--system-prompt"),
        (["--asr-partial-ms", "0"], "--asr-partial-ms"),
    ],
)
def test_bad_model_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as refused:
        load_config(argv, environ={})
    assert str(refused.value).startswith(flag + ":"), str(refused.value)


def test_each_setting_is_declared_once_and_the_readme_table_is_its():
    from config import SETTINGS, markdown_table

    flags = [item.flag for item in SETTINGS]
    names = [item.name for item in SETTINGS if item.setting.per_session]
    assert len(flags) == len(set(flags)) > 50 and len(names) == len(set(names))
    assert all(item.setting.help for item in SETTINGS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "regenerate the README's table: python -c 'import config; print(config.markdown_table())'"
    # The check can fail: a default that differs from the table is found.
    assert markdown_table().replace("`8080`", "`8081`") not in readme


def test_help_shows_every_flag_with_its_default_and_variable():
    from config import SETTINGS, build_parser

    text = " ".join(build_parser().format_help().split())
    for item in SETTINGS:
        assert item.flag in text and f"[env {item.env}]" in text
    assert "--commit-ms MS" in text and "(default 750)" in text


def test_a_session_changes_turn_settings_by_their_flat_names_within_limits():
    from config import TurnConfig

    turn = TurnConfig().updated({"commit_ms": 900, "backchannel_max_ms": 0, "eagerness": "high"})
    assert (turn.endpointing.commit_ms, turn.interruption.backchannel_max_ms, turn.endpointing.eagerness) == (900, 0, "high")
    assert turn.public()["commit_ms"] == 900 and "webrtc_aggressiveness" not in turn.public()
    for bad, message in (
        ({"commit_ms": 100.5}, "whole number"),
        ({"threshold": float("nan")}, "number in"),
        ({"pause_ms": True}, "number in"),
        ({"vad": "webrtc"}, "unknown turn_detection field"),
        ({"commit_ms": 200}, "turn_detection.commit_ms must be greater than pause_ms"),
    ):
        with pytest.raises(ValueError, match=message):
            TurnConfig().updated(bad)
