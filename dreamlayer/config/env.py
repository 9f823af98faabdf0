"""Every environment variable DreamLayer's Python code reads: one table, one reader, one error.

Why one module: the img2img service, dream_layer.py and the launcher share variables (the ComfyUI
address, the folders, the ports the launcher probes). Reading them in one place means each is
parsed the same way everywhere, a bad value stops every entry point at start with the same
message (``IMG2IMG_THREADS='many': expected a whole number >= 1``), and docs/configuration.md can
be checked against ``VARIABLES`` by a test so the two never drift.

Nothing here runs at import: an ``Environment`` is a snapshot taken when a program starts (or a
mapping a test hands in), and each variable is parsed the first time it is asked for.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

from dreamlayer import PROJECT_ROOT

log = logging.getLogger(__name__)

DOCS = "docs/configuration.md"


class ConfigError(ValueError):
    """A setting has a value the program cannot run with. The message names the variable, the
    value given and what is allowed, so it can be shown to the user as is."""


# ---------------------------------------------------------------------------- kinds of values

@dataclass(frozen=True)
class Kind:
    """How a variable's text becomes a value. ``parse`` raises ValueError (optionally with a
    reason) when the text is not what ``allowed`` describes."""
    allowed: str
    parse: Callable[[str], Any]


def _whole(minimum: int, maximum: Optional[int] = None, allowed: Optional[str] = None) -> Kind:
    def parse(text):
        if not text.lstrip("+").isdigit():  # int() would also take "1_000" and " -0 "
            raise ValueError()
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError()
        return value
    return Kind(allowed or f"a whole number >= {minimum}", parse)


def _seconds_parse(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError()
    return value


def _path_parse(text):
    return Path(text).expanduser()


def _url_parse(text):
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError()
    parts.port  # noqa: B018 - raises ValueError for a port out of range
    return text.rstrip("/")


def _origin_check(text):
    if text == "*":
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") \
            or parts.query or parts.fragment:
        raise ValueError(f"{text!r} is not an origin")
    port = parts.port
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    # as browsers send it: lower case, no default port (so that "http://Example:80" matches)
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _origins_parse(text):
    origins = tuple(_origin_check(o.strip()) for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError()
    return origins


def _server_url_parse(text):
    """A ComfyUI's address: no user:password (it would be shown in /health and in messages), no
    query or fragment (the client appends paths to it)."""
    url = _url_parse(text)
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError(f"{parts.scheme}://{parts.hostname}…: a server's address has no user:password, "
                         "query or fragment")
    return url


def _same_server(url: str) -> tuple:
    """What tells two spellings of one server apart: scheme, host (localhost = 127.0.0.1), port,
    path (ComfyUI serves its routes under /api/ too)."""
    parts = urlsplit(url)
    host = {"localhost": "127.0.0.1"}.get(parts.hostname, parts.hostname)
    path = parts.path.rstrip("/").removesuffix("/api")
    return parts.scheme, host, parts.port or {"http": 80, "https": 443}[parts.scheme], path


def _urls_parse(text):
    urls = tuple(_server_url_parse(u.strip()) for u in text.split(","))  # an empty item is an error
    if len({_same_server(u) for u in urls}) != len(urls):
        raise ValueError("a server is listed twice (perhaps spelt two ways: localhost and 127.0.0.1, "
                         "a default port, /api)")
    return urls


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _redis_url_parse(text):
    if not text:
        return ""  # unset: the embedded, single-process default
    parts = urlsplit(text)
    if parts.scheme in ("redis", "rediss") and parts.hostname or parts.scheme == "unix" and parts.path:
        parts.port  # noqa: B018
        return text
    raise ValueError()


def _one_of(choices: tuple):
    """A parser of one of ``choices`` (lower case), written in any case."""
    def parse(text):
        if text.lower() not in choices:
            raise ValueError()
        return text.lower()
    return parse


#: What one img2img process does with REDIS_URL set: serve the API, run queue workers, or both.
ROLES = ("both", "api", "worker")
#: Where the img2img service keeps the images it serves when REDIS_URL is set.
IMAGE_STORES = ("redis", "folder")


def _bool_parse(text):
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError()


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level_parse(text):
    if text.upper() not in _LEVELS:
        raise ValueError()
    return text.upper()


def _host_parse(text):
    # "localhost:5004" or "http://0.0.0.0" are common slips; IPv6 addresses have two colons or more
    if "/" in text or any(c.isspace() for c in text) or text.count(":") == 1:
        raise ValueError()
    return text


def _args_parse(text):
    return tuple(shlex.split(text))  # ValueError for an unclosed quote


WHOLE = _whole(1)
PORT = _whole(0, 65535, "a port number 0-65535 (0 = any free port)")
SECONDS = Kind("a number of seconds > 0", _seconds_parse)
PATH = Kind("a path (~ allowed)", _path_parse)
TEXT = Kind("any text", str)
URL = Kind("an http:// or https:// URL with a host", _url_parse)
REDIS_URL = Kind("empty, or redis://[:password@]host[:port][/db], rediss://... or unix:///path/to/socket",
                  _redis_url_parse)
ROLE = Kind("both, api or worker", _one_of(ROLES))
IMAGE_STORE = Kind("redis or folder", _one_of(IMAGE_STORES))
URLS = Kind("one or more comma-separated http:// or https:// URLs with a host", _urls_parse)
ORIGINS = Kind("comma-separated origins (scheme://host[:port]) or *", _origins_parse)
ORIGIN = Kind("an origin (scheme://host[:port]) or *", _origin_check)
BOOL = Kind("1, true, yes, on or 0, false, no, off", _bool_parse)
LOG_LEVEL = Kind("DEBUG, INFO, WARNING, ERROR or CRITICAL", _level_parse)
HOST = Kind("a host name or IP address, without scheme or port", _host_parse)
ARGS = Kind("command-line arguments, quoted as in a POSIX shell", _args_parse)


# ---------------------------------------------------------------------------- the table

IMG2IMG, BACKEND, LAUNCHER = "img2img", "dream_layer", "launcher"
ALL, SERVICES = (IMG2IMG, BACKEND, LAUNCHER), (IMG2IMG, BACKEND)


@dataclass(frozen=True)
class Variable:
    name: str
    kind: Kind
    #: As it would be written in the environment. None = unset, or derived from other variables
    #: (docs/configuration.md says how). A relative path default is inside the project folder.
    default: Optional[str]
    #: The programs that use it. dream_layer.py and the launcher also check every img2img
    #: variable (they build its Config), so a bad value stops whichever starts first.
    used_by: tuple
    #: Old names, still read, with a warning.
    deprecated: tuple = ()
    #: Never shown in messages.
    secret: bool = False


V = Variable
VARIABLES = (
    # ComfyUI and the folders shared with it
    V("COMFY_API_URL", URLS, "http://127.0.0.1:8188", ALL),
    V("COMFY_PROMPTS_PER_BACKEND", WHOLE, None, (IMG2IMG,)),
    V("COMFY_TIMEOUT_S", SECONDS, "600", (IMG2IMG,)),
    V("COMFYUI_DIR", PATH, None, ALL),
    V("COMFYUI_INPUT_DIR", PATH, None, (IMG2IMG, BACKEND)),
    V("COMFYUI_OUTPUT_DIR", PATH, None, SERVICES),
    # the img2img service (:5004)
    V("IMG2IMG_HOST", HOST, "127.0.0.1", (IMG2IMG, LAUNCHER)),
    V("IMG2IMG_PORT", PORT, "5004", (IMG2IMG, LAUNCHER)),
    V("IMG2IMG_THREADS", WHOLE, "32", (IMG2IMG,)),
    V("IMG2IMG_API_KEY", TEXT, "", (IMG2IMG,), secret=True),
    V("IMG2IMG_JOB_WORKERS", WHOLE, "32", (IMG2IMG,)),
    V("IMG2IMG_JOB_TTL_S", SECONDS, "3600", (IMG2IMG,)),
    V("IMG2IMG_JOBS_KEPT", WHOLE, "500", (IMG2IMG,)),
    V("IMG2IMG_JOBS_UNFINISHED", WHOLE, "100", (IMG2IMG,)),
    V("PUBLIC_BASE_URL", URL, None, (IMG2IMG,)),
    # scaling out (docs/scaling.md): jobs in Redis, run by RQ workers of any replica
    V("REDIS_URL", REDIS_URL, "", (IMG2IMG,), secret=True),
    V("IMG2IMG_ROLE", ROLE, "both", (IMG2IMG,)),
    V("IMG2IMG_QUEUE_WORKERS", WHOLE, None, (IMG2IMG,)),
    V("IMG2IMG_JOB_LEASE_S", SECONDS, "15", (IMG2IMG,)),
    V("IMG2IMG_IMAGES", IMAGE_STORE, "redis", (IMG2IMG,)),
    V("SERVED_IMAGES_DIR", PATH, "served_images", SERVICES),
    V("MAX_CONTENT_LENGTH", WHOLE, "67108864", SERVICES),
    V("MAX_MASK_BYTES", WHOLE, "10485760", (IMG2IMG,)),
    V("MAX_IMAGE_PIXELS", WHOLE, "40000000", SERVICES),
    V("MAX_OUTPUT_PIXELS", WHOLE, "16777216", (IMG2IMG,)),
    V("MAX_OUTPAINT_PX", WHOLE, "2048", (IMG2IMG,)),
    V("DEFAULT_MODEL", TEXT, "", (IMG2IMG,)),
    # both services
    V("CORS_ORIGINS", ORIGINS, "http://localhost:8080,http://127.0.0.1:8080", SERVICES),
    V("LOG_LEVEL", LOG_LEVEL, "INFO", SERVICES),
    V("DREAMLAYER_SETTINGS_FILE", PATH, "data/settings.json", SERVICES),
    V("DREAMLAYER_DEMO", BOOL, "0", SERVICES),
    # dream_layer.py (:5002) and the ComfyUI it starts
    V("DREAMLAYER_HOST", HOST, "127.0.0.1", (BACKEND, LAUNCHER), ("DREAM_LAYER_HOST",)),
    V("DREAMLAYER_PORT", PORT, "5002", (BACKEND, LAUNCHER), ("DREAM_LAYER_PORT",)),
    V("DREAMLAYER_THREADS", WHOLE, "8", (BACKEND,), ("DREAM_LAYER_THREADS",)),
    V("DREAMLAYER_MODEL_NAMES_FILE", PATH, "data/model_display_names.json", (BACKEND,)),
    V("DREAMLAYER_LOG_DIR", PATH, "logs", (BACKEND, LAUNCHER)),
    V("COMFYUI_PYTHON", TEXT, "", (BACKEND,)),
    V("COMFYUI_EXTRA_ARGS", ARGS, "", (BACKEND,)),
    V("COMFYUI_CORS_ORIGIN", ORIGIN, None, (BACKEND,)),
    V("COMFYUI_START_TIMEOUT_S", SECONDS, "120", (BACKEND, LAUNCHER), ("COMFYUI_START_TIMEOUT",)),
    V("DREAMLAYER_API_KEYS_FILE", PATH, "data/api_keys.json", (BACKEND,)),
    V("DREAMLAYER_MAX_MODEL_BYTES", WHOLE, "34359738368", (BACKEND,)),
    V("DREAMLAYER_OPEN_FOLDERS", BOOL, "1", (BACKEND,)),
    # start_dream_layer.py
    V("DREAMLAYER_HEALTH_TIMEOUT_S", SECONDS, "60", (LAUNCHER,), ("DREAMLAYER_HEALTH_TIMEOUT",)),
    V("DREAMLAYER_DEMO_DIR", PATH, "data/demo_comfyui", (LAUNCHER,)),
)
del V
BY_NAME = {v.name: v for v in VARIABLES}
#: Read by start_dream_layer.sh / .bat before any Python runs; documented with the rest.
SCRIPT_VARIABLES = ("DREAMLAYER_VENV", "DREAMLAYER_SKIP_INSTALL", "PYTHON")
#: Deprecated name -> its replacement.
DEPRECATED = {old: v.name for v in VARIABLES for old in v.deprecated}
#: Names under these prefixes that are not in the table are reported (a typo is otherwise silent).
OWN_PREFIXES = ("DREAMLAYER_", "DREAM_LAYER_", "IMG2IMG_")
_KNOWN = set(BY_NAME) | set(DEPRECATED) | set(SCRIPT_VARIABLES)


def default(name: str) -> Any:
    """The parsed default of a variable (None when it has none): what an unset variable means.
    The dataclasses use it for their field defaults, so the table is the only place a default is
    written."""
    var = BY_NAME[name]
    if var.default is None:
        return None
    value = var.kind.parse(var.default)
    if isinstance(value, Path) and not value.is_absolute():
        value = PROJECT_ROOT / value
    return value


def check(name: str, value: Any) -> None:
    """Raise ConfigError if a typed value (say from ``Config.replace``) breaks the variable's rule."""
    var = BY_NAME[name]
    try:
        var.kind.parse(str(value))
    except ValueError as exc:
        raise ConfigError(_message(var, name, str(value), exc)) from None


def _message(var: Variable, given_as: str, text: str, exc: ValueError) -> str:
    # a password in a URL is not echoed either (user:password@ → ***@)
    shown = "'***'" if var.secret else repr(re.sub(r"(?<=://)[^/@,\s]*@", "***@", text))
    reason = f" ({exc})" if str(exc) else ""
    alias = f" (deprecated name of {var.name})" if given_as != var.name else ""
    return f"{given_as}={shown}{alias}: expected {var.kind.allowed}{reason}"


# ---------------------------------------------------------------------------- the reader

class Environment:
    """One snapshot of the environment, read through the table.

    Each program builds one at start and hands it to the ``from_env`` constructors, so every
    variable is read once and its deprecation warning is given once. ``warnings`` collects those
    notes (a deprecated name, an unknown DREAMLAYER_/IMG2IMG_ variable) for the log, which is set
    up only after the configuration (the log level is part of it) is known.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = dict(os.environ if environ is None else environ)
        self._values: dict = {}
        self._logged = 0
        self.warnings: list = [self._unknown_note(name) for name in sorted(self._environ)
                               if name.startswith(OWN_PREFIXES) and name not in _KNOWN]

    @classmethod
    def of(cls, environ: "Environment | Mapping[str, str] | None") -> "Environment":
        """``environ`` if it is already an Environment (shared by nested configs), else a new one."""
        return environ if isinstance(environ, Environment) else cls(environ)

    def snapshot(self) -> dict:
        """The variables as given: what child processes inherit (they validate them again)."""
        return dict(self._environ)

    def get(self, name: str) -> Any:
        """The parsed value of ``name`` (a name in VARIABLES), its default when unset or empty.
        Raises ConfigError naming the variable, its value and what is allowed."""
        if name not in self._values:
            var = BY_NAME[name]
            text, given_as = self._text(var)
            if text is None:
                self._values[name] = default(name)
            else:
                try:
                    self._values[name] = var.kind.parse(text)
                except ValueError as exc:
                    raise ConfigError(_message(var, given_as, text, exc)) from None
        return self._values[name]

    def log_warnings(self, logger: logging.Logger = log) -> None:
        """Log the notes gathered so far as WARNINGs (each once)."""
        for note in self.warnings[self._logged:]:
            logger.warning("%s", note)
        self._logged = len(self.warnings)

    # -- helpers ------------------------------------------------------------------------------
    def _raw(self, name: str) -> Optional[str]:
        text = (self._environ.get(name) or "").strip()
        return text or None  # set but empty means unset (VAR= in a compose file or a shell)

    def _text(self, var: Variable) -> tuple:
        """(text, the name it was found under), or (None, name) when unset."""
        text = self._raw(var.name)
        for old in var.deprecated:
            old_text = self._raw(old)
            if old_text is None:
                continue
            if text is not None:
                self._deprecation(f"{old} is deprecated and ignored because {var.name} is also "
                                  f"set; remove {old} ({DOCS})")
            else:
                self._deprecation(f"{old} is deprecated: rename it to {var.name} ({DOCS})")
            if text is None:
                return old_text, old
        return text, var.name

    def _deprecation(self, note: str) -> None:
        self.warnings.append(note)
        warnings.warn(note, DeprecationWarning, stacklevel=5)

    @staticmethod
    def _unknown_note(name: str) -> str:
        close = difflib.get_close_matches(name, sorted(_KNOWN), n=1, cutoff=0.85)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{name} is not a DreamLayer setting and is ignored{hint} ({DOCS})"


def error_line(program: str, exc: ConfigError) -> str:
    return f"{program}: invalid configuration value {exc} (see {DOCS})"


def report(program: str, exc: ConfigError) -> int:
    """Print the one line an entry point gives, on stderr and before logging is set up, when the
    configuration is invalid; returns the exit code (2, as for a bad command line)."""
    print(error_line(program, exc), file=sys.stderr)
    return 2
