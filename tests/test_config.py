"""bot/config.py and bot/secret.py: settings are validated up front, one readable line per mistake."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from bot.config import (
    DEFAULT_COMETAPI_BASE_URL,
    DEFAULT_DISCORD_API_BASE_URL,
    ConfigError,
    Settings,
    load_settings,
    read_environment,
)
from bot.secret import Secret

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "MTIz.discord-token-SECRET.abc"
KEY = "sk-comet-SECRET-key"
MINIMAL = {"DISCORD_TOKEN": TOKEN, "COMETAPI_KEY": KEY}

VARIABLES = [
    "DISCORD_TOKEN", "COMETAPI_KEY", "COMETAPI_BASE_URL", "DISCORD_API_BASE_URL", "DISCORD_GATEWAY_URL",
    "FLUXBOT_DATA_DIR", "FLUXBOT_POLL_TIMEOUT", "FLUXBOT_ALLOW_PRIVATE_NETWORK", "FLUXBOT_DEV_GUILD_ID",
    "FLUXBOT_MAX_ACTIVE_PER_USER", "FLUXBOT_MAX_ACTIVE", "FLUXBOT_API_RPS", "FLUXBOT_CACHE_MAX_MB",
    "FLUXBOT_CACHE_TTL_DAYS", "FLUXBOT_MAX_IMAGE_MB", "FLUXBOT_API_TIMEOUT", "FLUXBOT_LOG_LEVEL",
]


def load(**extra: str) -> Settings:
    return load_settings({**MINIMAL, **extra})


def test_minimal_env_gives_defaults() -> None:
    settings = load()
    assert settings.discord_token.get() == TOKEN
    assert settings.cometapi_key.get() == KEY
    assert settings.cometapi_base_url == DEFAULT_COMETAPI_BASE_URL == "https://api.cometapi.com"
    assert settings.cometapi_host == "api.cometapi.com"
    assert settings.discord_api_base_url == DEFAULT_DISCORD_API_BASE_URL
    assert settings.discord_gateway_url is None
    assert settings.data_dir == Path("data")
    assert settings.poll_timeout == 600.0
    assert settings.allow_private_network is False
    assert settings.dev_guild_id is None
    assert (settings.max_active_per_user, settings.max_active) == (3, 1000)
    assert settings.api_rps == 20.0
    assert (settings.cache_max_mb, settings.cache_ttl_days, settings.max_image_mb) == (1024, 30.0, 50.0)
    assert settings.api_timeout == 20.0
    assert settings.log_level == "INFO"


def test_empty_values_mean_default() -> None:
    settings = load_settings({**MINIMAL, **{name: "" for name in VARIABLES[2:]}})
    assert settings == load()


def test_env_example_as_is_loads_with_the_two_secrets_filled_in() -> None:
    example = REPO_ROOT / ".env.example"
    if not example.is_file():
        pytest.skip(".env.example is not there yet")
    values = {k: v for k, v in dotenv_values(example).items() if v is not None}
    settings = load_settings({**values, **MINIMAL})
    assert settings.poll_timeout == 600.0
    assert settings.cometapi_base_url == DEFAULT_COMETAPI_BASE_URL
    documented = set(values)
    assert set(VARIABLES) <= documented, f"not in .env.example: {set(VARIABLES) - documented}"


def test_valid_values_are_parsed() -> None:
    settings = load(
        COMETAPI_BASE_URL="http://127.0.0.1:8080/",
        DISCORD_API_BASE_URL="https://proxy.example/api/v10/",
        DISCORD_GATEWAY_URL="wss://gateway.example/",
        FLUXBOT_DATA_DIR=" /var/lib/fluxbot ",
        FLUXBOT_POLL_TIMEOUT=" 90.5 ",
        FLUXBOT_ALLOW_PRIVATE_NETWORK="YES",
        FLUXBOT_DEV_GUILD_ID=" 123456789012345678 ",
        FLUXBOT_MAX_ACTIVE_PER_USER="5",
        FLUXBOT_MAX_ACTIVE="20",
        FLUXBOT_API_RPS="2.5",
        FLUXBOT_CACHE_MAX_MB="64",
        FLUXBOT_CACHE_TTL_DAYS="0.5",
        FLUXBOT_MAX_IMAGE_MB="8",
        FLUXBOT_API_TIMEOUT="3",
        FLUXBOT_LOG_LEVEL="debug",
    )
    assert settings.cometapi_base_url == "http://127.0.0.1:8080"
    assert settings.cometapi_host == "127.0.0.1"
    assert settings.discord_api_base_url == "https://proxy.example/api/v10"
    assert settings.discord_gateway_url == "wss://gateway.example/"
    assert settings.data_dir == Path("/var/lib/fluxbot")
    assert settings.poll_timeout == 90.5
    assert settings.allow_private_network is True
    assert settings.dev_guild_id == 123456789012345678
    assert (settings.max_active_per_user, settings.max_active, settings.api_rps) == (5, 20, 2.5)
    assert (settings.cache_max_mb, settings.cache_ttl_days, settings.max_image_mb) == (64, 0.5, 8.0)
    assert settings.api_timeout == 3.0
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("On", True), ("0", False),
                                               ("false", False), ("NO", False), ("off", False)])
def test_bools(raw: str, expected: bool) -> None:
    assert load(FLUXBOT_ALLOW_PRIVATE_NETWORK=raw).allow_private_network is expected


BAD_VALUES = [
    ("FLUXBOT_POLL_TIMEOUT", "-1"),
    ("FLUXBOT_POLL_TIMEOUT", "0"),
    ("FLUXBOT_POLL_TIMEOUT", "ten minutes"),
    ("FLUXBOT_POLL_TIMEOUT", "inf"),
    ("FLUXBOT_POLL_TIMEOUT", "nan"),
    ("FLUXBOT_POLL_TIMEOUT", "5\n6"),
    ("FLUXBOT_API_TIMEOUT", "0"),
    ("FLUXBOT_API_TIMEOUT", "-0.5"),
    ("FLUXBOT_DEV_GUILD_ID", "my-server"),
    ("FLUXBOT_DEV_GUILD_ID", "-5"),
    ("FLUXBOT_DEV_GUILD_ID", "12.5"),
    ("FLUXBOT_DEV_GUILD_ID", "0"),
    ("FLUXBOT_DEV_GUILD_ID", str(2**64)),
    ("COMETAPI_BASE_URL", "ftp://api.cometapi.com"),
    ("COMETAPI_BASE_URL", "api.cometapi.com"),
    ("COMETAPI_BASE_URL", "http://"),
    ("COMETAPI_BASE_URL", "http://[bad"),
    ("DISCORD_API_BASE_URL", "ws://discord.com/api/v10"),
    ("DISCORD_GATEWAY_URL", "https://gateway.discord.gg"),
    ("DISCORD_GATEWAY_URL", "wss://"),
    ("DISCORD_GATEWAY_URL", "gateway.discord.gg"),
    ("FLUXBOT_ALLOW_PRIVATE_NETWORK", "maybe"),
    ("FLUXBOT_ALLOW_PRIVATE_NETWORK", "2"),
    ("FLUXBOT_MAX_ACTIVE_PER_USER", "0"),
    ("FLUXBOT_MAX_ACTIVE_PER_USER", "1.5"),
    ("FLUXBOT_MAX_ACTIVE", "-10"),
    ("FLUXBOT_API_RPS", "0"),
    ("FLUXBOT_CACHE_MAX_MB", "lots"),
    ("FLUXBOT_CACHE_TTL_DAYS", "-1"),
    ("FLUXBOT_MAX_IMAGE_MB", "0"),
    ("FLUXBOT_LOG_LEVEL", "LOUD"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_is_one_line_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: value})
    message = str(info.value)
    assert info.value.variable == variable
    assert message.startswith(variable + ":")
    assert ".env.example" in message
    assert "\n" not in message and "\r" not in message
    assert len(message) < 300


def test_bad_value_is_quoted_and_cut_short() -> None:
    with pytest.raises(ConfigError) as info:
        load(FLUXBOT_MAX_ACTIVE="x" * 500)
    assert "'xxxx" in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("variable", ["DISCORD_TOKEN", "COMETAPI_KEY"])
@pytest.mark.parametrize("value", [None, "", "   ", "\n"])
def test_missing_secret(variable: str, value: str | None) -> None:
    env = dict(MINIMAL)
    if value is None:
        del env[variable]
    else:
        env[variable] = value
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert "required" in str(info.value)
    assert ".env.example" in str(info.value)


@pytest.mark.parametrize("variable", ["DISCORD_TOKEN", "COMETAPI_KEY"])
def test_secret_with_inner_whitespace(variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: "abc def"})
    assert info.value.variable == variable
    assert "abc" not in str(info.value)  # the (broken) secret is not echoed


def test_secrets_are_trimmed() -> None:
    settings = load_settings({"DISCORD_TOKEN": f"  {TOKEN}\n", "COMETAPI_KEY": f"\t{KEY} "})
    assert (settings.discord_token.get(), settings.cometapi_key.get()) == (TOKEN, KEY)


def test_secrets_never_show() -> None:
    settings = load()
    renderings = [
        repr(settings), str(settings), f"{settings}", f"{settings!r}", "%s %r" % (settings, settings),  # noqa: UP031
        str(settings.discord_token), repr(settings.cometapi_key), f"{settings.discord_token}",
        f"{settings.cometapi_key!r}", f"{settings.cometapi_key:>40}", format(settings.discord_token, ""),
        str([settings.discord_token]), str({"k": settings.cometapi_key}),
    ]
    for text in renderings:
        assert TOKEN not in text and KEY not in text
        assert "SECRET" not in text
    assert Secret.MASK in repr(settings)


def test_secret_behaviour() -> None:
    secret = Secret("value")
    assert secret.get() == "value"
    assert secret == Secret("value") and secret != Secret("other") and secret != "value"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        pickle.dumps(load())


# --------------------------------------------------------------------------- .env and the environment


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_file_is_read_and_environment_wins(tmp_path: Path, clean_environ: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f'DISCORD_TOKEN="{TOKEN}"\nCOMETAPI_KEY={KEY}\nFLUXBOT_POLL_TIMEOUT=30\n# a comment\n'
        "FLUXBOT_LOG_LEVEL=WARNING\nEMPTY_NAME\n"
    )
    clean_environ.setenv("FLUXBOT_POLL_TIMEOUT", "45")
    env = read_environment(env_file)
    assert env["DISCORD_TOKEN"] == TOKEN  # quotes removed
    assert env["FLUXBOT_POLL_TIMEOUT"] == "45"
    assert "EMPTY_NAME" not in env
    settings = load_settings(env)
    assert settings.poll_timeout == 45.0
    assert settings.log_level == "WARNING"
    assert settings.cometapi_key.get() == KEY


def test_default_env_file_is_the_one_in_the_cwd(tmp_path: Path, clean_environ: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("COMETAPI_KEY=from-cwd\n")
    clean_environ.chdir(tmp_path)
    assert read_environment()["COMETAPI_KEY"] == "from-cwd"


def test_missing_or_no_env_file(tmp_path: Path, clean_environ: pytest.MonkeyPatch) -> None:
    clean_environ.setenv("COMETAPI_KEY", "from-env")
    assert read_environment(tmp_path / "absent.env")["COMETAPI_KEY"] == "from-env"
    assert read_environment(None)["COMETAPI_KEY"] == "from-env"
    (tmp_path / "dir.env").mkdir()
    assert read_environment(tmp_path / "dir.env")["COMETAPI_KEY"] == "from-env"


# --------------------------------------------------------------------------- python -m bot


def _run_bot(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in VARIABLES and not k.startswith("FLUXBOT_")}
    base.pop("PYTHONWARNINGS", None)
    base["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "bot"], cwd=cwd, env={**base, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert ".env.example" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_without_token_exits_2(tmp_path: Path) -> None:
    result = _run_bot(tmp_path)
    _assert_one_line_error(result, "DISCORD_TOKEN")


def test_cli_bad_poll_timeout_exits_2(tmp_path: Path) -> None:
    result = _run_bot(tmp_path, DISCORD_TOKEN=TOKEN, COMETAPI_KEY=KEY, FLUXBOT_POLL_TIMEOUT="-1")
    _assert_one_line_error(result, "FLUXBOT_POLL_TIMEOUT")
    assert TOKEN not in result.stderr and KEY not in result.stderr


def test_cli_reads_env_file_in_cwd_and_environment_wins(tmp_path: Path) -> None:
    # The secrets come from .env (otherwise DISCORD_TOKEN would be named); the environment's -1
    # beats the file's valid 30 (otherwise the start would go on and try to reach Discord).
    (tmp_path / ".env").write_text(f"DISCORD_TOKEN={TOKEN}\nCOMETAPI_KEY={KEY}\nFLUXBOT_POLL_TIMEOUT=30\n")
    result = _run_bot(tmp_path, FLUXBOT_POLL_TIMEOUT="-1")
    _assert_one_line_error(result, "FLUXBOT_POLL_TIMEOUT")
