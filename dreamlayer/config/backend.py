"""Configuration of dream_layer.py (port 5002), read once from environment variables.

Settings it shares with the img2img service (COMFY_API_URL, COMFYUI_DIR, COMFYUI_INPUT_DIR,
SERVED_IMAGES_DIR, CORS_ORIGINS, LOG_LEVEL) are parsed by config.Config, so both services read
them the same way. Defaults are documented in docs/installation.md.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dreamlayer.config.img2img import Config, ConfigError
from dreamlayer.config.saved_paths import demo_mode_from_env, settings_file_from_env

from dreamlayer import PROJECT_ROOT as HERE


@dataclass(frozen=True)
class DreamLayerConfig:
    #: The shared settings (ComfyUI address and install, served images, CORS, log level).
    shared: Config = field(default_factory=Config)
    host: str = "127.0.0.1"
    port: int = 5002
    threads: int = 8
    settings_file: Path = HERE / "data" / "settings.json"
    display_names_file: Path = HERE / "data" / "model_display_names.json"
    log_dir: Path = HERE / "logs"
    demo: bool = False
    #: Python that runs ComfyUI's main.py; empty = chosen from the install (comfyui_process).
    comfyui_python: str = ""
    comfyui_extra_args: tuple = ()
    #: Origin ComfyUI allows (--enable-cors-header), for the frontend's WebSocket to ComfyUI.
    comfyui_cors_origin: str = "http://localhost:8080"
    comfyui_start_timeout_s: float = 120.0
    #: API keys posted by the page's "Add API KEY" dialog (JSON, mode 0600).
    api_keys_file: Path = HERE / "data" / "api_keys.json"
    #: Largest model file POST /api/upload-model accepts (bytes).
    max_model_bytes: int = 32 * 1024 ** 3
    #: show-in-folder may open the desktop's file manager (for loopback clients only).
    open_folders: bool = True

    @property
    def comfy_api_url(self) -> str:
        return self.shared.comfy_api_url

    @property
    def comfyui_dir(self) -> Optional[Path]:
        return self.shared.comfyui_dir

    @property
    def comfyui_log(self) -> Path:
        return self.log_dir / "comfyui.log"

    def replace(self, **changes) -> "DreamLayerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DreamLayerConfig":
        env = os.environ if environ is None else environ
        d = cls()

        def get(name, default):
            value = (env.get(name) or "").strip()
            return value if value else default

        shared = Config.from_env(env)
        try:
            cfg = cls(
                shared=shared,
                host=get("DREAM_LAYER_HOST", d.host),
                port=int(get("DREAM_LAYER_PORT", d.port)),
                threads=int(get("DREAM_LAYER_THREADS", d.threads)),
                settings_file=settings_file_from_env(env),
                display_names_file=Path(get("DREAMLAYER_MODEL_NAMES_FILE", str(d.display_names_file))).expanduser(),
                log_dir=Path(get("DREAMLAYER_LOG_DIR", str(d.log_dir))).expanduser(),
                demo=demo_mode_from_env(env),
                comfyui_python=get("COMFYUI_PYTHON", ""),
                comfyui_extra_args=tuple(shlex.split(get("COMFYUI_EXTRA_ARGS", ""))),
                comfyui_cors_origin=get("COMFYUI_CORS_ORIGIN",
                                        shared.cors_origins[0] if shared.cors_origins else ""),
                comfyui_start_timeout_s=float(get("COMFYUI_START_TIMEOUT", d.comfyui_start_timeout_s)),
                api_keys_file=Path(get("DREAMLAYER_API_KEYS_FILE", str(d.api_keys_file))).expanduser(),
                max_model_bytes=int(get("DREAMLAYER_MAX_MODEL_BYTES", d.max_model_bytes)),
                open_folders=get("DREAMLAYER_OPEN_FOLDERS", "1").lower() not in ("0", "false", "no", "off"),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid configuration value: {exc}") from exc
        if not 0 < cfg.port < 65536:
            raise ConfigError("DREAM_LAYER_PORT must be between 1 and 65535")
        if cfg.threads < 1:
            raise ConfigError("DREAM_LAYER_THREADS must be at least 1")
        if cfg.max_model_bytes < 1:
            raise ConfigError("DREAMLAYER_MAX_MODEL_BYTES must be at least 1")
        return cfg
