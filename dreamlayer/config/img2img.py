"""Configuration of the img2img service (port 5004), built once from the environment.

The variables, their defaults and rules live in one table (``dreamlayer.config.env``, documented in
docs/configuration.md); this dataclass is what the service runs with. Tests build a Config
directly (or with overrides) and hand it to ``create_app`` instead of touching the environment.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from dreamlayer.config import env as E
from dreamlayer.config.env import ConfigError, Environment
from dreamlayer.config.saved_paths import get_directories

__all__ = ["Config", "ConfigError", "DEFAULT_CORS_ORIGINS", "HTTP_UPLOAD_SUBFOLDER"]

DEFAULT_CORS_ORIGINS = E.default("CORS_ORIGINS")

#: Subfolder of ComfyUI's temp folder that receives uploads made over HTTP (no shared disk);
#: ComfyUI empties its temp folder at start and exit (it has no API to delete an upload).
HTTP_UPLOAD_SUBFOLDER = "dreamlayer_img2img"


@dataclass(frozen=True)
class Config:
    #: The first ComfyUI backend (the one whose folders COMFYUI_DIR describes).
    comfy_api_url: str = E.default("COMFY_API_URL")[0]
    #: Every backend (COMFY_API_URL may list several); () = just comfy_api_url.
    comfy_api_urls: tuple = ()
    #: This service's prompts one backend may hold at a time; None = 1 with several backends,
    #: no limit with one (ComfyUI's own queue orders them, as before).
    prompts_per_backend: Optional[int] = None
    #: Local ComfyUI install; its input/ folder receives uploads directly.
    comfyui_dir: Optional[Path] = None
    #: ComfyUI's input folder, when it is shared with this machine. None = upload over HTTP.
    comfyui_input_dir: Optional[Path] = None
    #: ComfyUI's output folder, when it is shared with this machine: results are read from it
    #: instead of GET /view. None = always GET /view.
    comfyui_output_dir: Optional[Path] = None
    served_images_dir: Path = E.default("SERVED_IMAGES_DIR")
    public_base_url: str = f"http://localhost:{E.default('IMG2IMG_PORT')}"
    cors_origins: tuple = DEFAULT_CORS_ORIGINS
    comfy_timeout_s: float = E.default("COMFY_TIMEOUT_S")
    host: str = E.default("IMG2IMG_HOST")
    #: 0 = the operating system picks a free port.
    port: int = E.default("IMG2IMG_PORT")
    threads: int = E.default("IMG2IMG_THREADS")
    #: Whole request body limit (bytes).
    max_content_length: int = E.default("MAX_CONTENT_LENGTH")
    #: Mask file limit (bytes), measured on the bytes received.
    max_mask_bytes: int = E.default("MAX_MASK_BYTES")
    #: Largest accepted image, in pixels (decompression bombs are rejected before decoding).
    max_image_pixels: int = E.default("MAX_IMAGE_PIXELS")
    #: Largest image a workflow may produce or upscale to (hires fix), in pixels.
    max_output_pixels: int = E.default("MAX_OUTPUT_PIXELS")
    #: Most pixels outpainting may add on one side.
    max_outpaint_px: int = E.default("MAX_OUTPAINT_PX")
    #: Checkpoint used when a request names none; empty = the first one ComfyUI lists.
    default_model: str = E.default("DEFAULT_MODEL")
    #: Background jobs: worker threads, and how long / how many finished jobs are kept.
    job_workers: int = E.default("IMG2IMG_JOB_WORKERS")
    job_ttl_s: float = E.default("IMG2IMG_JOB_TTL_S")
    jobs_kept: int = E.default("IMG2IMG_JOBS_KEPT")
    #: At most this many async jobs queued or running at once (each holds its inputs in memory).
    jobs_unfinished: int = E.default("IMG2IMG_JOBS_UNFINISHED")
    #: Redis for jobs shared by every replica (docs/scaling.md); "" = in this process only.
    redis_url: str = E.default("REDIS_URL")
    #: With redis_url: "both" (API and queue workers), "api" or "worker".
    role: str = E.default("IMG2IMG_ROLE")
    #: With redis_url: queue worker threads of this process; None = one per backend slot, plus a spare
    #: (COMFY_PROMPTS_PER_BACKEND x backends), 4 when the backends have no slot limit.
    queue_workers: Optional[int] = None
    #: With redis_url: a job whose worker stops renewing its lease this long (killed replica)
    #: is run again by another worker, once.
    job_lease_s: float = E.default("IMG2IMG_JOB_LEASE_S")
    #: With redis_url: served images kept in Redis with the job TTL ("redis"), or in
    #: served_images_dir ("folder"), which every replica must then share.
    images: str = E.default("IMG2IMG_IMAGES")
    api_key: str = E.default("IMG2IMG_API_KEY")
    log_level: str = E.default("LOG_LEVEL")
    #: start_dream_layer.sh --demo: the "ComfyUI" is the project's fake; /health says so.
    demo: bool = E.default("DREAMLAYER_DEMO")
    extra: Mapping = field(default_factory=dict)

    def __post_init__(self):
        # comfy_api_url is always the first of comfy_api_urls, whichever of the two was given
        if not self.comfy_api_urls:
            object.__setattr__(self, "comfy_api_urls", (self.comfy_api_url,))
        elif self.comfy_api_urls[0] != self.comfy_api_url:
            object.__setattr__(self, "comfy_api_url", self.comfy_api_urls[0])

    @property
    def uploads_over_http(self) -> bool:
        return self.comfyui_input_dir is None

    def replace(self, **changes) -> "Config":
        if "comfy_api_url" in changes and "comfy_api_urls" not in changes:
            changes["comfy_api_urls"] = ()  # one new address replaces the list
        return _normalise(dataclasses.replace(self, **changes))

    @classmethod
    def from_env(cls, environ: Environment | Mapping[str, str] | None = None) -> "Config":
        """The service's configuration from ``environ`` (default: the process environment, read
        now). An Environment is shared with the caller, so nested configs read it once.
        Raises ConfigError for the first invalid variable."""
        env = Environment.of(environ)
        port = env.get("IMG2IMG_PORT")
        comfyui_dir = env.get("COMFYUI_DIR")
        urls = env.get("COMFY_API_URL")
        return _normalise(cls(
            comfy_api_url=urls[0],
            comfy_api_urls=urls,
            prompts_per_backend=env.get("COMFY_PROMPTS_PER_BACKEND"),
            comfyui_dir=comfyui_dir,
            comfyui_input_dir=env.get("COMFYUI_INPUT_DIR"),
            comfyui_output_dir=_output_dir(env, comfyui_dir),
            served_images_dir=env.get("SERVED_IMAGES_DIR"),
            public_base_url=env.get("PUBLIC_BASE_URL") or f"http://localhost:{port}",
            cors_origins=env.get("CORS_ORIGINS"),
            comfy_timeout_s=env.get("COMFY_TIMEOUT_S"),
            host=env.get("IMG2IMG_HOST"),
            port=port,
            threads=env.get("IMG2IMG_THREADS"),
            max_content_length=env.get("MAX_CONTENT_LENGTH"),
            max_mask_bytes=env.get("MAX_MASK_BYTES"),
            max_image_pixels=env.get("MAX_IMAGE_PIXELS"),
            max_output_pixels=env.get("MAX_OUTPUT_PIXELS"),
            max_outpaint_px=env.get("MAX_OUTPAINT_PX"),
            default_model=env.get("DEFAULT_MODEL"),
            job_workers=env.get("IMG2IMG_JOB_WORKERS"),
            job_ttl_s=env.get("IMG2IMG_JOB_TTL_S"),
            jobs_kept=env.get("IMG2IMG_JOBS_KEPT"),
            jobs_unfinished=env.get("IMG2IMG_JOBS_UNFINISHED"),
            redis_url=env.get("REDIS_URL"),
            role=env.get("IMG2IMG_ROLE"),
            queue_workers=env.get("IMG2IMG_QUEUE_WORKERS"),
            job_lease_s=env.get("IMG2IMG_JOB_LEASE_S"),
            images=env.get("IMG2IMG_IMAGES"),
            api_key=env.get("IMG2IMG_API_KEY"),
            log_level=env.get("LOG_LEVEL"),
            demo=env.get("DREAMLAYER_DEMO"),
        ))


def _output_dir(env: Environment, comfyui_dir: Optional[Path]) -> Optional[Path]:
    """COMFYUI_OUTPUT_DIR, else where a ComfyUI under COMFYUI_DIR writes: the output directory of
    DreamLayer's saved settings (what dream_layer.py launches it with), else COMFYUI_DIR/output."""
    explicit = env.get("COMFYUI_OUTPUT_DIR")
    if explicit is not None or comfyui_dir is None:
        return explicit
    return get_directories(env.get("DREAMLAYER_SETTINGS_FILE"), comfyui_dir).output_dir


def _normalise(cfg: Config) -> Config:
    """Derive the input and output folders from COMFYUI_DIR and strip trailing slashes from URLs."""
    input_dir, output_dir = cfg.comfyui_input_dir, cfg.comfyui_output_dir
    if input_dir is None and cfg.comfyui_dir is not None:
        input_dir = cfg.comfyui_dir / "input"
    if output_dir is None and cfg.comfyui_dir is not None:
        output_dir = cfg.comfyui_dir / "output"
    E.check("COMFY_TIMEOUT_S", cfg.comfy_timeout_s)
    E.check("IMG2IMG_PORT", cfg.port)
    urls = tuple(u.rstrip("/") for u in (cfg.comfy_api_urls or (cfg.comfy_api_url,)))
    return dataclasses.replace(
        cfg,
        comfy_api_url=urls[0],
        comfy_api_urls=urls,
        public_base_url=cfg.public_base_url.rstrip("/"),
        comfyui_input_dir=Path(input_dir) if input_dir is not None else None,
        comfyui_output_dir=Path(output_dir) if output_dir is not None else None,
        served_images_dir=Path(cfg.served_images_dir),
    )
