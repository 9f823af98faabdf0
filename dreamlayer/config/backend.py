"""Configuration of dream_layer.py (port 5002), built once from the environment.

The variables it shares with the img2img service (COMFY_API_URL, COMFYUI_DIR, SERVED_IMAGES_DIR,
CORS_ORIGINS, LOG_LEVEL, ...) come through ``Config``, so both services read them the same way;
every variable, default and rule is in ``dreamlayer.config.env`` (docs/configuration.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dreamlayer.config import env as E
from dreamlayer.config.env import ConfigError, Environment
from dreamlayer.config.img2img import Config

__all__ = ["DreamLayerConfig", "ConfigError"]


@dataclass(frozen=True)
class DreamLayerConfig:
    #: The shared settings (ComfyUI address and install, served images, CORS, log level).
    shared: Config = field(default_factory=Config)
    host: str = E.default("DREAMLAYER_HOST")
    #: 0 = the operating system picks a free port (not with start_dream_layer, which probes it).
    port: int = E.default("DREAMLAYER_PORT")
    threads: int = E.default("DREAMLAYER_THREADS")
    settings_file: Path = E.default("DREAMLAYER_SETTINGS_FILE")
    display_names_file: Path = E.default("DREAMLAYER_MODEL_NAMES_FILE")
    log_dir: Path = E.default("DREAMLAYER_LOG_DIR")
    demo: bool = E.default("DREAMLAYER_DEMO")
    #: Python that runs ComfyUI's main.py; empty = chosen from the install (comfyui_process).
    comfyui_python: str = E.default("COMFYUI_PYTHON")
    comfyui_extra_args: tuple = E.default("COMFYUI_EXTRA_ARGS")
    #: Origin ComfyUI allows (--enable-cors-header), for the frontend's WebSocket to ComfyUI.
    comfyui_cors_origin: str = E.default("CORS_ORIGINS")[0]
    comfyui_start_timeout_s: float = E.default("COMFYUI_START_TIMEOUT_S")
    #: API keys posted by the page's "Add API KEY" dialog (JSON, mode 0600).
    api_keys_file: Path = E.default("DREAMLAYER_API_KEYS_FILE")
    #: Largest model file POST /api/upload-model accepts (bytes).
    max_model_bytes: int = E.default("DREAMLAYER_MAX_MODEL_BYTES")
    #: show-in-folder may open the desktop's file manager (for loopback clients only).
    open_folders: bool = E.default("DREAMLAYER_OPEN_FOLDERS")

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
    def from_env(cls, environ: Environment | Mapping[str, str] | None = None) -> "DreamLayerConfig":
        """dream_layer's configuration from ``environ`` (default: the process environment, read
        now). Raises ConfigError for the first invalid variable."""
        env = Environment.of(environ)
        shared = Config.from_env(env)
        return cls(
            shared=shared,
            host=env.get("DREAMLAYER_HOST"),
            port=env.get("DREAMLAYER_PORT"),
            threads=env.get("DREAMLAYER_THREADS"),
            settings_file=env.get("DREAMLAYER_SETTINGS_FILE"),
            display_names_file=env.get("DREAMLAYER_MODEL_NAMES_FILE"),
            log_dir=env.get("DREAMLAYER_LOG_DIR"),
            demo=env.get("DREAMLAYER_DEMO"),
            comfyui_python=env.get("COMFYUI_PYTHON"),
            comfyui_extra_args=env.get("COMFYUI_EXTRA_ARGS"),
            # CORS_ORIGINS is never empty (its rule), so its first origin is always there
            comfyui_cors_origin=env.get("COMFYUI_CORS_ORIGIN") or shared.cors_origins[0],
            comfyui_start_timeout_s=env.get("COMFYUI_START_TIMEOUT_S"),
            api_keys_file=env.get("DREAMLAYER_API_KEYS_FILE"),
            max_model_bytes=env.get("DREAMLAYER_MAX_MODEL_BYTES"),
            open_folders=env.get("DREAMLAYER_OPEN_FOLDERS"),
        )
