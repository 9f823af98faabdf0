"""DreamLayer's main backend (port 5002): model lists, path settings and generated images for the
DreamLayer frontend, the routes behind its buttons (page_routes), and optionally the local ComfyUI
it all runs on.

``python dream_layer.py`` serves with waitress on DREAMLAYER_HOST:DREAMLAYER_PORT;
``--start-comfyui`` also starts ComfyUI from COMFYUI_DIR (unless one already answers);
``--comfyui-only`` just runs ComfyUI in the foreground (what start_dream_layer uses).
``create_app(config)`` builds the app for tests. img2img is not here: it is the :5004 service.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from flask import Blueprint, Flask, current_app, jsonify
from flask_cors import CORS

from dreamlayer.comfyui import client as comfy_client
from dreamlayer.comfyui.process import ComfyUIProcess, LaunchError, launch_spec
from dreamlayer.config.env import ConfigError, Environment, report
from dreamlayer.config.backend import DreamLayerConfig
from dreamlayer.config.saved_paths import (SettingsError, demo_health_fields, get_directories, load_settings,
                                 unreachable_hint, update_settings)
from dreamlayer.img2img.advanced_params import builtin_upscaler_entries
from dreamlayer.errors import InvalidParameter, register_error_handlers
from dreamlayer.web_security import no_sniffing, only_from_allowed_origins
from dreamlayer.backend import page_routes
from dreamlayer.backend.images import ImageFolders, open_folder
from dreamlayer.backend.models import ModelCatalog
from dreamlayer.img2img.staging import ServedImages

log = logging.getLogger(__name__)

bp = Blueprint("dream_layer", __name__)


class Backend:
    """What the request handlers share: configuration, the ComfyUI client, the model catalog,
    the served images folder and, when this process started it, the ComfyUI child."""

    def __init__(self, config: DreamLayerConfig, client: comfy_client.ComfyClient,
                 comfyui: ComfyUIProcess | None = None):
        self.config = config
        self.client = client
        self.catalog = ModelCatalog(client, config.display_names_file)
        self.served = ServedImages(config.shared.served_images_dir)
        #: generated images by name: the served folder, then ComfyUI's output folder
        self.images = ImageFolders(self.served.directory,
                                   lambda: (config.shared.comfyui_output_dir, self.directories().output_dir),
                                   config.shared.comfyui_input_dir)
        self.comfyui = comfyui

    def directories(self):
        return get_directories(self.config.settings_file, self.config.comfyui_dir)


def backend() -> Backend:
    return current_app.extensions["dream_layer"]


# ---------------------------------------------------------------------------- routes

@bp.get("/")
def index():
    return jsonify({"status": "ok", "service": "dream_layer"})


@bp.get("/health")
def health():
    b = backend()
    up = b.client.is_up()
    comfyui = {"url": b.client.base_url, "reachable": up}
    if not up:
        comfyui["hint"] = unreachable_hint(b.client.base_url)
    comfyui.update(demo_health_fields(b.config.demo))
    if b.comfyui is not None:
        comfyui["started_by_dream_layer"] = {"pid": b.comfyui.pid, "running": b.comfyui.running(),
                                             "exit_code": b.comfyui.exit_code(),
                                             "log": str(b.comfyui.log_file)}
    return jsonify({"status": "ok", "service": "dream_layer", "comfyui": comfyui,
                    "directories": b.directories().to_dict()})


def _models(kind: str):
    models, warnings = backend().catalog.models(kind)
    body = {"status": "success", "models": models}
    if warnings:
        body["warnings"] = warnings
    return jsonify(body)


@bp.get("/api/models")
def checkpoints():
    return _models("checkpoints")


@bp.get("/api/lora-models")
def loras():
    return _models("loras")


@bp.get("/api/upscaler-models")
def upscalers():
    """The upscale models ComfyUI lists, then the built-in methods the hires fix also takes
    (Latent, Lanczos, ...), so the page's drop-downs offer both."""
    models, warnings = backend().catalog.models("upscalers")
    body = {"status": "success", "models": models + builtin_upscaler_entries()}
    if warnings:
        body["warnings"] = warnings
    return jsonify(body)


@bp.get("/api/controlnet/models")
def controlnets():
    return _models("controlnet")


@bp.get("/api/settings/paths")
def get_path_settings():
    b = backend()
    return jsonify({"status": "success", "settings": load_settings(b.config.settings_file),
                    "directories": b.directories().to_dict()})


@bp.post("/api/settings/paths")
def set_path_settings():
    posted = page_routes.json_object('a JSON object such as {"outputDirectory": "/abs/path", '
                                     '"modelsDirectory": "/abs/path"}')
    b = backend()
    try:
        saved, warnings = update_settings(b.config.settings_file, posted)
    except SettingsError as exc:
        raise InvalidParameter(exc.field, exc.message, code="invalid_path") from None
    return jsonify({"status": "success",
                    "message": "Settings saved. ComfyUI reads these folders when it starts: restart "
                               "it (or start_dream_layer) for them to take effect.",
                    "restart_required": True, "settings": saved, "warnings": warnings,
                    "directories": b.directories().to_dict()})


# ---------------------------------------------------------------------------- errors -> JSON

def create_app(config: DreamLayerConfig | None = None, *, client: comfy_client.ComfyClient | None = None,
               comfyui: ComfyUIProcess | None = None) -> Flask:
    """Build the app. Tests pass their own config (files, ComfyUI address); without one (a WSGI
    server importing the app) it is read from the environment now."""
    if config is None:
        env = Environment()
        config = DreamLayerConfig.from_env(env)
        env.log_warnings()
    app = Flask(__name__, static_folder=None)
    app.debug = False  # Flask would read FLASK_DEBUG from the environment
    app.config.update(MAX_CONTENT_LENGTH=1024 * 1024)
    app.json.sort_keys = False
    app.url_map.merge_slashes = False  # no HTML redirects; "//etc/passwd" is simply not found
    client = client or comfy_client.ComfyClient(config.comfy_api_url)
    app.extensions["dream_layer"] = Backend(config, client, comfyui)
    CORS(app, origins=list(config.shared.cors_origins), methods=["GET", "POST", "OPTIONS"],
         allow_headers=["Content-Type"], max_age=600)
    # show-in-folder starts the desktop's file manager, for loopback clients only; tests replace it
    app.config["FOLDER_OPENER"] = open_folder if config.open_folders else None
    register_error_handlers(app)
    app.before_request(only_from_allowed_origins(config.shared.cors_origins))
    app.after_request(no_sniffing)
    app.register_blueprint(bp)
    app.register_blueprint(page_routes.bp)
    return app


# ---------------------------------------------------------------------------- running

def start_comfyui(config: DreamLayerConfig) -> ComfyUIProcess:
    """Start ComfyUI from COMFYUI_DIR, listening where COMFY_API_URL points and writing where
    the saved settings say. Raises LaunchError with what to change."""
    if config.comfyui_dir is None:
        raise LaunchError("COMFYUI_DIR is not set: point it at your ComfyUI folder (the one with "
                          "main.py) to let DreamLayer start ComfyUI")
    spec = launch_spec(comfyui_dir=config.comfyui_dir, comfy_api_url=config.comfy_api_url,
                       input_dir=config.shared.comfyui_input_dir or config.comfyui_dir / "input",
                       directories=get_directories(config.settings_file, config.comfyui_dir),
                       python=config.comfyui_python, cors_origin=config.comfyui_cors_origin,
                       extra_args=config.comfyui_extra_args)
    return ComfyUIProcess(spec, config.comfyui_log).start()


def _exit_on_sigterm() -> None:
    """SIGTERM (start_dream_layer's stop, systemd, docker) unwinds like Ctrl-C, so the finally
    blocks below stop the ComfyUI we started."""
    def handler(signum, frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "SIGBREAK"):  # Windows: start_dream_layer stops children with CTRL_BREAK
        signal.signal(signal.SIGBREAK, handler)


def run_comfyui_only(config: DreamLayerConfig) -> int:
    """Run ComfyUI in the foreground until it exits or we are told to stop."""
    client = comfy_client.ComfyClient(config.comfy_api_url)
    if client.is_up():
        log.error("A ComfyUI already answers at %s; not starting another", config.comfy_api_url)
        return 3
    proc = start_comfyui(config)
    try:
        if proc.wait_until_up(client.is_up, config.comfyui_start_timeout_s):
            log.info("ComfyUI answers at %s", config.comfy_api_url)
        while proc.running():
            proc.proc.wait()
        log.error("ComfyUI exited with code %s; see %s", proc.exit_code(), proc.log_file)
        return proc.exit_code() or 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        proc.stop()


def serve(config: DreamLayerConfig, *, with_comfyui: bool) -> int:
    from waitress.server import create_server

    client = comfy_client.ComfyClient(config.comfy_api_url)
    comfyui = None
    if with_comfyui:
        if client.is_up():
            log.info("ComfyUI already answers at %s; not starting another", config.comfy_api_url)
        else:
            comfyui = start_comfyui(config)
            threading.Thread(target=comfyui.wait_until_up,
                             args=(client.is_up, config.comfyui_start_timeout_s),
                             daemon=True, name="comfyui-start").start()
    try:
        app = create_app(config, client=client, comfyui=comfyui)
        try:
            server = create_server(app, host=config.host, port=config.port, threads=config.threads,
                                   ident="dreamlayer",  # a model upload may be many GB (upload-model)
                                   max_request_body_size=max(config.max_model_bytes,
                                                             config.shared.max_content_length) + 1024 * 1024)
        except OSError as exc:
            log.error("cannot listen on %s:%d (%s); is another DreamLayer running? Stop it or set "
                      "DREAMLAYER_PORT", config.host, config.port, exc)
            return 1
        reachable = client.is_up()
        port = getattr(server, "effective_port", config.port)  # DREAMLAYER_PORT=0: the one chosen
        log.info("dream_layer on http://%s:%s — ComfyUI at %s %s%s", config.host, port,
                 config.comfy_api_url, "answers" if reachable else "does NOT answer (yet)",
                 " [DEMO: fake stand-in, no diffusion model]" if config.demo else "")
        if not reachable and comfyui is None:
            log.warning(unreachable_hint(config.comfy_api_url))
        server.run()
        return 0
    finally:
        if comfyui is not None:
            comfyui.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--start-comfyui", action="store_true",
                       help="also start ComfyUI from COMFYUI_DIR, unless one already answers")
    group.add_argument("--comfyui-only", action="store_true",
                       help="only run ComfyUI from COMFYUI_DIR, in the foreground")
    args = parser.parse_args(argv)
    env = Environment()
    try:
        config = DreamLayerConfig.from_env(env)
    except ConfigError as exc:
        return report("dream_layer", exc)
    logging.basicConfig(level=config.shared.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env.log_warnings()
    _exit_on_sigterm()
    try:
        if args.comfyui_only:
            return run_comfyui_only(config)
        return serve(config, with_comfyui=args.start_comfyui)
    except LaunchError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
