"""Configuration of the img2img service, read once from environment variables.

Every setting has a documented default (docs/configuration.md). Tests build a Config directly
(or with overrides) and hand it to ``create_app`` instead of touching the environment.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dreamlayer.config.saved_paths import demo_mode_from_env, get_directories, settings_file_from_env

from dreamlayer import PROJECT_ROOT as HERE

DEFAULT_CORS_ORIGINS = ("http://localhost:8080", "http://127.0.0.1:8080")

#: Subfolder of ComfyUI's input folder that receives uploads made over HTTP (no shared disk).
#: ComfyUI has no API to delete an upload, so these files stay there; see docs/api.md.
HTTP_UPLOAD_SUBFOLDER = "dreamlayer_img2img"


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class Config:
    comfy_api_url: str = "http://127.0.0.1:8188"
    #: Local ComfyUI install; its input/ folder receives uploads directly.
    comfyui_dir: Optional[Path] = None
    #: ComfyUI's input folder, when it is shared with this machine. None = upload over HTTP.
    comfyui_input_dir: Optional[Path] = None
    #: ComfyUI's output folder, when it is shared with this machine: results are read from it
    #: instead of GET /view. None = always GET /view.
    comfyui_output_dir: Optional[Path] = None
    served_images_dir: Path = HERE / "served_images"
    public_base_url: str = "http://localhost:5004"
    cors_origins: tuple = DEFAULT_CORS_ORIGINS
    comfy_timeout_s: float = 600.0
    host: str = "127.0.0.1"
    port: int = 5004
    threads: int = 32
    #: Whole request body limit (bytes).
    max_content_length: int = 64 * 1024 * 1024
    #: Mask file limit (bytes), measured on the bytes received.
    max_mask_bytes: int = 10 * 1024 * 1024
    #: Largest accepted image, in pixels (decompression bombs are rejected before decoding).
    max_image_pixels: int = 40_000_000
    #: Largest image a workflow may produce or upscale to (hires fix), in pixels.
    max_output_pixels: int = 4096 * 4096
    #: Checkpoint used when a request names none; empty = the first one ComfyUI lists.
    default_model: str = ""
    #: Background jobs: worker threads, and how long / how many finished jobs are kept.
    job_workers: int = 32
    job_ttl_s: float = 3600.0
    jobs_kept: int = 500
    api_key: str = ""
    log_level: str = "INFO"
    #: start_dream_layer.sh --demo: the "ComfyUI" is the project's fake; /health says so.
    demo: bool = False
    extra: Mapping = field(default_factory=dict)

    @property
    def uploads_over_http(self) -> bool:
        return self.comfyui_input_dir is None

    def replace(self, **changes) -> "Config":
        return _normalise(dataclasses.replace(self, **changes))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if environ is None else environ
        d = cls()

        def get(name, default):
            value = env.get(name, "")
            return value.strip() if value.strip() else default

        port = get("IMG2IMG_PORT", str(d.port))
        try:
            cfg = cls(
                comfy_api_url=get("COMFY_API_URL", d.comfy_api_url),
                comfyui_dir=_path_or_none(get("COMFYUI_DIR", "")),
                comfyui_input_dir=_path_or_none(get("COMFYUI_INPUT_DIR", "")),
                comfyui_output_dir=_output_dir_from_env(env, get),
                served_images_dir=Path(get("SERVED_IMAGES_DIR", str(d.served_images_dir))),
                public_base_url=get("PUBLIC_BASE_URL", f"http://localhost:{port}"),
                cors_origins=tuple(o.strip() for o in get("CORS_ORIGINS", ",".join(d.cors_origins)).split(",") if o.strip()),
                comfy_timeout_s=float(get("COMFY_TIMEOUT_S", d.comfy_timeout_s)),
                host=get("IMG2IMG_HOST", d.host),
                port=int(port),
                threads=int(get("IMG2IMG_THREADS", d.threads)),
                max_content_length=int(get("MAX_CONTENT_LENGTH", d.max_content_length)),
                max_mask_bytes=int(get("MAX_MASK_BYTES", d.max_mask_bytes)),
                max_image_pixels=int(get("MAX_IMAGE_PIXELS", d.max_image_pixels)),
                max_output_pixels=int(get("MAX_OUTPUT_PIXELS", d.max_output_pixels)),
                default_model=get("DEFAULT_MODEL", d.default_model),
                job_workers=int(get("IMG2IMG_JOB_WORKERS", d.job_workers)),
                job_ttl_s=float(get("IMG2IMG_JOB_TTL_S", d.job_ttl_s)),
                jobs_kept=int(get("IMG2IMG_JOBS_KEPT", d.jobs_kept)),
                api_key=get("IMG2IMG_API_KEY", ""),
                log_level=get("LOG_LEVEL", d.log_level).upper(),
                demo=demo_mode_from_env(env),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid configuration value: {exc}") from exc
        return _normalise(cfg)


def _output_dir_from_env(env, get) -> Optional[Path]:
    """COMFYUI_OUTPUT_DIR, else where a ComfyUI under COMFYUI_DIR writes: the output directory of
    DreamLayer's saved settings (what dream_layer.py launches it with), else COMFYUI_DIR/output."""
    explicit = _path_or_none(get("COMFYUI_OUTPUT_DIR", ""))
    comfyui_dir = _path_or_none(get("COMFYUI_DIR", ""))
    if explicit is not None or comfyui_dir is None:
        return explicit
    return get_directories(settings_file_from_env(env), comfyui_dir).output_dir


def _path_or_none(value: str) -> Optional[Path]:
    return Path(value).expanduser() if value else None


def _normalise(cfg: Config) -> Config:
    """Derive the input and output folders from COMFYUI_DIR and strip trailing slashes from URLs."""
    input_dir, output_dir = cfg.comfyui_input_dir, cfg.comfyui_output_dir
    if input_dir is None and cfg.comfyui_dir is not None:
        input_dir = cfg.comfyui_dir / "input"
    if output_dir is None and cfg.comfyui_dir is not None:
        output_dir = cfg.comfyui_dir / "output"
    if cfg.comfy_timeout_s <= 0:
        raise ConfigError("COMFY_TIMEOUT_S must be positive")
    if not 0 < cfg.port < 65536:
        raise ConfigError("IMG2IMG_PORT must be between 1 and 65535")
    return dataclasses.replace(
        cfg,
        comfy_api_url=cfg.comfy_api_url.rstrip("/"),
        public_base_url=cfg.public_base_url.rstrip("/"),
        comfyui_input_dir=Path(input_dir) if input_dir is not None else None,
        comfyui_output_dir=Path(output_dir) if output_dir is not None else None,
        served_images_dir=Path(cfg.served_images_dir),
    )
