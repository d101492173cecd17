"""Where local infrastructure keeps its state and which loopback ports it uses.

Everything is resolved once, when ``LocalInfra`` is built, so that a bad environment value
(``DTX_PG_PORT=abc``) fails immediately with a message naming the variable instead of deep
inside a server start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dtx_infra.errors import InfraError

HOST = "127.0.0.1"
DEFAULT_PG_PORT = 55432
DEFAULT_KAFKA_PORT = 59092

# services/dtx_infra/settings.py -> parents[2] is the repository root in an editable install.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The monorepo root when running from a checkout, else the current directory.

    The fallback matters for a non-editable wheel, where ``parents[2]`` is site-packages.
    """
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT
    return Path.cwd()


def parse_port(name: str, raw: str) -> int:
    """Parse a TCP port from an environment variable, naming the variable when it is bad."""
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InfraError(f"{name} must be a TCP port number between 1 and 65535, got {raw!r}")
    return int(text)


def _port(env: Mapping[str, str], name: str, explicit: int | None, default: int) -> int:
    if explicit is not None:
        return parse_port(name, str(explicit))
    raw = env.get(name)
    return default if raw is None or raw == "" else parse_port(name, raw)


@dataclass(frozen=True)
class InfraSettings:
    """Resolved locations and ports; explicit arguments win over the environment."""

    state_dir: Path
    cache_dir: Path
    pg_port: int
    kafka_port: int
    kafka_controller_port: int

    @classmethod
    def resolve(
        cls,
        state_dir: Path | None = None,
        *,
        pg_port: int | None = None,
        kafka_port: int | None = None,
        kafka_controller_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> InfraSettings:
        env = os.environ if env is None else env
        if state_dir is None:
            raw_state = env.get("DTX_STATE_DIR")
            state_dir = Path(raw_state) if raw_state else repo_root() / ".dtx"
        raw_cache = env.get("DTX_CACHE_DIR")
        cache_dir = Path(raw_cache) if raw_cache else Path.home() / ".cache" / "dtx"
        pg = _port(env, "DTX_PG_PORT", pg_port, DEFAULT_PG_PORT)
        kafka = _port(env, "DTX_KAFKA_PORT", kafka_port, DEFAULT_KAFKA_PORT)
        # The controller listener defaults to the next port so that moving DTX_KAFKA_PORT
        # alone is enough to get a second, non-colliding broker.
        controller = _port(env, "DTX_KAFKA_CONTROLLER_PORT", kafka_controller_port, kafka + 1)
        if len({pg, kafka, controller}) != 3:
            raise InfraError(
                f"DTX_PG_PORT ({pg}), DTX_KAFKA_PORT ({kafka}) and "
                f"DTX_KAFKA_CONTROLLER_PORT ({controller}) must be three different ports"
            )
        return cls(
            state_dir=state_dir.expanduser().absolute(),
            cache_dir=cache_dir.expanduser().absolute(),
            pg_port=pg,
            kafka_port=kafka,
            kafka_controller_port=controller,
        )
