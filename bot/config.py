"""Settings, read once at start from the environment and ``.env`` (the environment wins)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from yarl import URL

from bot.secret import Secret

__all__ = ["ConfigError", "Settings", "load_settings", "read_environment"]

T = TypeVar("T")

DEFAULT_COMETAPI_BASE_URL = "https://api.cometapi.com"
DEFAULT_DISCORD_API_BASE_URL = "https://discord.com/api/v10"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A setting is missing or malformed. ``str()`` is the one line the process prints before it ends."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem} (see .env.example)")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    discord_token: Secret
    cometapi_key: Secret
    cometapi_base_url: str = DEFAULT_COMETAPI_BASE_URL
    discord_api_base_url: str = DEFAULT_DISCORD_API_BASE_URL
    discord_gateway_url: str | None = None
    data_dir: Path = Path("data")
    poll_timeout: float = 600.0
    allow_private_network: bool = False
    dev_guild_id: int | None = None
    max_active_per_user: int = 3
    max_active: int = 1000
    api_rps: float = 20.0
    cache_max_mb: int = 1024
    cache_ttl_days: float = 30.0
    max_image_mb: float = 50.0
    api_timeout: float = 20.0
    log_level: str = "INFO"

    @property
    def cometapi_host(self) -> str:
        return URL(self.cometapi_base_url).host or ""


def read_environment(env_file: Path | None = Path(".env")) -> dict[str, str]:
    """``.env`` values overlaid by the process environment, so a deployment can override a file."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        from dotenv import dotenv_values

        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


def _required(env: Mapping[str, str], name: str) -> Secret:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(name, "is required but not set")
    if any(c.isspace() for c in value):
        raise ConfigError(name, "contains whitespace; paste the value alone")
    return Secret(value)


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T, problem: str) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except (ValueError, TypeError):
        raise ConfigError(name, f"{problem}, got {raw.strip()[:40]!r}") from None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not (value > 0 and value < float("inf")):
        raise ValueError(raw)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _snowflake(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError(raw)
    value = int(raw)
    if not 0 < value < 2**64:
        raise ValueError(raw)
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(raw)


def _http_url(raw: str) -> str:
    url = URL(raw)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(raw)
    return raw.rstrip("/")


def _ws_url(raw: str) -> str:
    url = URL(raw)
    if url.scheme not in ("ws", "wss") or not url.host:
        raise ValueError(raw)
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(raw)
    return level


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate everything up front so a bad value stops the start, not the first user's request."""
    return Settings(
        discord_token=_required(env, "DISCORD_TOKEN"),
        cometapi_key=_required(env, "COMETAPI_KEY"),
        cometapi_base_url=_get(env, "COMETAPI_BASE_URL", _http_url, DEFAULT_COMETAPI_BASE_URL,
                               "must be an http(s) URL"),
        discord_api_base_url=_get(env, "DISCORD_API_BASE_URL", _http_url, DEFAULT_DISCORD_API_BASE_URL,
                                  "must be an http(s) URL including the version, like /api/v10"),
        discord_gateway_url=_get(env, "DISCORD_GATEWAY_URL", _ws_url, None, "must be a ws:// or wss:// URL"),
        data_dir=Path(env.get("FLUXBOT_DATA_DIR", "").strip() or "data"),
        poll_timeout=_get(env, "FLUXBOT_POLL_TIMEOUT", _positive_float, 600.0,
                          "must be a positive number of seconds"),
        allow_private_network=_get(env, "FLUXBOT_ALLOW_PRIVATE_NETWORK", _bool, False, "must be true or false"),
        dev_guild_id=_get(env, "FLUXBOT_DEV_GUILD_ID", _snowflake, None, "must be a numeric Discord guild id"),
        max_active_per_user=_get(env, "FLUXBOT_MAX_ACTIVE_PER_USER", _positive_int, 3,
                                 "must be a positive whole number"),
        max_active=_get(env, "FLUXBOT_MAX_ACTIVE", _positive_int, 1000, "must be a positive whole number"),
        api_rps=_get(env, "FLUXBOT_API_RPS", _positive_float, 20.0, "must be a positive number"),
        cache_max_mb=_get(env, "FLUXBOT_CACHE_MAX_MB", _positive_int, 1024, "must be a positive whole number"),
        cache_ttl_days=_get(env, "FLUXBOT_CACHE_TTL_DAYS", _positive_float, 30.0, "must be a positive number"),
        max_image_mb=_get(env, "FLUXBOT_MAX_IMAGE_MB", _positive_float, 50.0, "must be a positive number"),
        api_timeout=_get(env, "FLUXBOT_API_TIMEOUT", _positive_float, 20.0,
                         "must be a positive number of seconds"),
        log_level=_get(env, "FLUXBOT_LOG_LEVEL", _log_level, "INFO", "must be DEBUG, INFO, WARNING or ERROR"),
    )
