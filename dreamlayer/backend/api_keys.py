"""API keys of the closed-source model services, as the page's "Add API KEY" dialog posts them
(POST /api/add-api-key {"alias": "BFL_API_KEY", "api-key": "…"}).

They are kept in one JSON object file {alias: key} (default data/api_keys.json,
DREAMLAYER_API_KEYS_FILE) that only the owner can read (0600), replaced atomically on every save.
A key is never logged, never put into an error message and never sent back: answers name the
alias only.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from dreamlayer.config.saved_paths import write_json_atomic
from dreamlayer.errors import BadRequest, InvalidParameter

log = logging.getLogger(__name__)

#: The aliases the page's dialog offers (the environment variable names DreamLayer uses for them).
ALIASES = ("BFL_API_KEY", "OPENAI_API_KEY", "IDEOGRAM_API_KEY", "STABILITY_API_KEY", "GEMINI_API_KEY")
MAX_KEY_LENGTH = 4096

_lock = threading.Lock()


class InvalidApiKey(BadRequest):
    code = "invalid_api_key"


def check_key(alias, key) -> tuple[str, str]:
    """(alias, key) when both can be stored; raises without ever quoting the key."""
    if not isinstance(alias, str) or alias not in ALIASES:
        raise InvalidParameter("alias", f"'alias' must be one of {', '.join(ALIASES)}", code="unknown_api_key_alias",
                               allowed=list(ALIASES))
    if not isinstance(key, str) or not key.strip():
        raise InvalidApiKey("'api-key' must be a non-empty string", field="api-key")
    key = key.strip()
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidApiKey(f"'api-key' is longer than {MAX_KEY_LENGTH} characters", field="api-key")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise InvalidApiKey("'api-key' may only contain printable ASCII characters without spaces "
                            "(paste the key alone)", field="api-key")
    return alias, key


class ApiKeyStore:
    """The key file: read, update one alias, write back atomically with mode 0600."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # only the error's type: a parser message could quote part of the file
            log.warning("API key file %s is unreadable (%s); starting a new one", self.path, type(exc).__name__)
            return {}
        if not isinstance(data, dict):
            log.warning("API key file %s is not a JSON object; starting a new one", self.path)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def aliases(self) -> list:
        """The aliases that have a key (never the keys)."""
        return sorted(self._read())

    def save(self, alias: str, key: str) -> None:
        with _lock:
            data = self._read()
            data[alias] = key
            self._write(data)
        log.info("API key for %s saved in %s", alias, self.path)

    def _write(self, data: dict) -> None:
        write_json_atomic(self.path, data, prefix=".api_keys-", mode=0o600)
