"""DreamLayer's img2img + inpainting service (port 5004).

``python img2img_server.py`` serves the app with waitress on IMG2IMG_HOST:IMG2IMG_PORT;
``create_app(config)`` builds it for tests. See docs/api.md for the HTTP interface.
"""
from __future__ import annotations

import gc
import hmac
import io
import mimetypes
import uuid
import time
import logging
import sys
from functools import lru_cache

from flask import Blueprint, Flask, Response, current_app, jsonify, request, send_file, stream_with_context
from flask_cors import CORS

from dreamlayer import PROJECT_ROOT, allocator
from dreamlayer.comfyui import client as comfy_client
from dreamlayer.comfyui.errors import ComfyError
from dreamlayer.comfyui.pool import Backend, BackendPool
from dreamlayer.config.env import ConfigError, Environment, report
from dreamlayer.config.img2img import Config
from dreamlayer.config.saved_paths import demo_health_fields, unreachable_hint
from dreamlayer.errors import ApiError, InvalidParameter, error_response, register_error_handlers
from dreamlayer.backend.images import IMAGE_TYPES
from dreamlayer.web_security import no_sniffing, only_from_allowed_origins
from dreamlayer.img2img.disconnects import DisconnectWatch
from dreamlayer.img2img.long_requests import LongRequests
from dreamlayer.http_range import ignore_unusable_range
from dreamlayer.img2img import graceful_stop
from dreamlayer.img2img.service import Img2ImgService
from dreamlayer.jobs.store import JobStore, sse
from dreamlayer.img2img.request import FormRequest, parse_request
from dreamlayer.img2img.staging import ServedImages

log = logging.getLogger(__name__)

bp = Blueprint("img2img", __name__)
OPENAPI_PATH = PROJECT_ROOT / "docs" / "openapi.yaml"


def service() -> Img2ImgService:
    return current_app.extensions["img2img"]


def jobs() -> JobStore:
    return current_app.extensions["img2img_jobs"]


def _wants_async(req) -> bool:
    """``"async"`` in the parameters, else ``Prefer: respond-async`` (RFC 7240: a preference,
    so an explicit ``"async": false`` wins)."""
    flag = req.params.pop("async", None)
    if flag is not None and not isinstance(flag, bool):
        raise InvalidParameter("async", "'async' must be true or false")
    if flag is not None:
        return flag
    prefer = request.headers.get("Prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


@bp.post("/api/img2img")
def img2img():
    req = parse_request(request, max_mask_bytes=current_app.config["IMG2IMG"].max_mask_bytes)
    if not _wants_async(req):
        with current_app.extensions["img2img_long_requests"].held():  # or 503 busy
            run_id, svc, store = uuid.uuid4().hex, service(), jobs()
            watch = current_app.extensions["img2img_disconnects"]
            if getattr(store, "distributed", False):  # REDIS_URL: any replica's worker may run it
                with watch.watching(request.environ, lambda: _client_gone(store.abandon, run_id)):
                    return jsonify(store.generate(svc.prepare(req), request=req, job_id=run_id))
            with watch.watching(request.environ, lambda: _client_gone(svc.cancel_run, run_id)):
                return jsonify(svc.execute(svc.prepare(req), run_id=run_id))
    job = jobs().submit(service().prepare(req))  # validated before the 202: bad input is a 4xx now
    base = f"{current_app.config['IMG2IMG'].public_base_url}/api/img2img/jobs/{job.id}"
    body = {"job_id": job.id, "status": "queued", "status_url": base, "events_url": f"{base}/events",
            "cancel_url": f"{base}/cancel"}
    return jsonify(body), 202, {"Location": base, "Preference-Applied": "respond-async"}


def _client_gone(cancel, run_id: str) -> None:
    log.info("run %s: the client went away; its generation is cancelled", run_id)
    cancel(run_id)


@bp.get("/api/img2img/jobs/<job_id>")
def job_status(job_id):
    return jsonify(jobs().get(job_id).snapshot())


@bp.get("/api/img2img/jobs/<job_id>/events")
def job_events(job_id):
    job = jobs().get(job_id)
    try:
        last = int(request.headers.get("Last-Event-ID", "0") or 0)
    except ValueError:
        last = 0
    place = current_app.extensions["img2img_long_requests"].place()  # or 503 busy: a stream
    response = Response(stream_with_context(sse(job, last_event_id=max(0, last))),  # holds a thread
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(place)  # the server closes every answer, streamed to its end or not
    return response


@bp.post("/api/img2img/jobs/<job_id>/cancel")
def job_cancel(job_id):
    return jsonify(jobs().cancel(job_id).snapshot())


@bp.post("/api/img2img/interrupt")
def interrupt():
    """Cancel this service's generations (jobs and synchronous requests), nobody else's."""
    try:
        cancelled = jobs().cancel_all()
    finally:  # synchronous requests too, even when a job's ComfyUI cannot be reached (raised after)
        answer = service().interrupt()
    for job in cancelled:  # jobs' prompts were cancelled with their jobs (in this process)
        for prompt_id, outcome in getattr(job, "cancelled_prompt", {}).items():
            answer["outcomes"][prompt_id] = outcome
            if outcome != "not_found":
                answer["interrupted"].append(prompt_id)
    answer["cancelled_jobs"] = [job.id for job in cancelled]
    return jsonify(answer)


@bp.get("/images/<path:filename>")
@bp.get("/api/images/<path:filename>")
def served_image(filename):
    """/images/ answers as a download (Content-Disposition: attachment), so that the page's cross-origin
    "Download PNG" link saves the file instead of opening a tab; an <img> shows it all the same.
    /api/images/ answers inline."""
    mimetype = mimetypes.guess_type(filename)[0]
    found = service().served.lookup(filename) if mimetype in IMAGE_TYPES else None  # images only
    if found is None:
        raise ApiError(f"No image named {filename!r}", code="image_not_found", status=404)
    if isinstance(found, bytes):  # REDIS_URL: the image is kept in Redis
        found = io.BytesIO(found)
    ignore_unusable_range(request)
    attachment = request.path.startswith("/images/")
    return send_file(found, mimetype=mimetype, max_age=3600, as_attachment=attachment,
                     download_name=filename.rsplit("/", 1)[-1])


@bp.get("/health")
def health():
    svc = service()
    client = svc.client
    up = client.is_up()
    comfyui = {"url": client.base_url, "reachable": up, **demo_health_fields(current_app.config["IMG2IMG"].demo)}
    if not up:
        comfyui["hint"] = unreachable_hint(client.base_url)
    body = {"status": "ok", "service": "img2img", "active_generations": len(svc.active), "comfyui": comfyui}
    if len(svc.pool) > 1:
        body["backends"] = svc.pool.health()
    if getattr(jobs(), "distributed", False):
        body["queue"] = jobs().health()
    return jsonify(body)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document of this service (docs/openapi.yaml), as JSON."""
    return jsonify(_openapi_document())


@lru_cache(maxsize=1)
def _openapi_document() -> dict:
    import yaml

    return yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))


@bp.get("/")
def index():
    return jsonify({"status": "ok", "service": "img2img"})


def _require_api_key(app: Flask, key: str) -> None:
    @app.before_request
    def check_key():
        if request.method == "OPTIONS" or request.path == "/health":
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("X-API-Key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            return error_response(401, "unauthorized", "A valid API key is required "
                                   "(Authorization: Bearer <key> or X-API-Key: <key>)")
        return None


def backend_pool(config: Config, primary) -> BackendPool:
    """The ComfyUI backends of COMFY_API_URL. The shared folders (COMFYUI_DIR, ...) belong to the
    first; the others get their inputs over HTTP (into ComfyUI's temp folder) and outputs over
    GET /view. With several, each holds at most COMFY_PROMPTS_PER_BACKEND (default 1) prompts."""
    backends = [Backend(config.comfy_api_url, primary, config.comfyui_input_dir, config.comfyui_output_dir)]
    backends += [Backend(url, comfy_client.ComfyClient(url)) for url in config.comfy_api_urls[1:]]
    slots = config.prompts_per_backend or (1 if len(backends) > 1 else None)
    if config.redis_url:  # the slots are shared with every replica (jobs/slots.py)
        from dreamlayer.jobs.slots import SharedBackendPool

        return SharedBackendPool(backends, slots=slots).start()
    return BackendPool(backends, slots=slots).start()


def _job_store(config: Config, service: Img2ImgService):
    """In this process (the default), or in Redis for every replica (REDIS_URL)."""
    if not config.redis_url:
        return JobStore(service, workers=config.job_workers, ttl_s=config.job_ttl_s, max_kept=config.jobs_kept,
                        max_unfinished=config.jobs_unfinished)
    from dreamlayer.jobs.redis_store import RedisJobStore

    return RedisJobStore(service, url=config.redis_url, ttl_s=config.job_ttl_s, lease_s=config.job_lease_s,
                         comfy_timeout_s=config.comfy_timeout_s)


def _served_images(config: Config):
    """A folder (in process, or with REDIS_URL one that every replica shares: IMG2IMG_IMAGES=folder),
    or Redis, each image with its job's TTL (REDIS_URL's default: nothing to share but Redis)."""
    if not config.redis_url or config.images == "folder":
        return ServedImages(config.served_images_dir)
    from dreamlayer.jobs.images import RedisImages
    from dreamlayer.jobs.records import connect

    return RedisImages(connect(config.redis_url), config.redis_url, config.job_ttl_s)


def _queue_workers(config: Config, service: Img2ImgService):
    """The queue workers of this replica (REDIS_URL with IMG2IMG_ROLE both or worker), or None."""
    if not config.redis_url or config.role == "api":
        return None
    from dreamlayer.jobs.worker import QueueWorkers

    pool = service.pool
    # one per backend slot, plus a spare that takes a slot the moment a job ends (while the
    # finishing worker does RQ's bookkeeping of it)
    count = config.queue_workers or (len(pool) * pool.slots + 1 if pool.slots else 4)
    return QueueWorkers(service, config, count=count).start()


def shutdown(app: Flask, deadline: float | None = None) -> None:
    """Stop what create_app started: queue workers (their running jobs may finish, within 10 s or
    until ``deadline``, a time.monotonic()), the backend prober, the job store, the thread that
    makes ended runs' HTTP uploads small, the ComfyUI clients' idle connections (and the thread
    that keeps their spare WebSockets)."""
    workers = app.extensions.get("img2img_workers")
    if workers is not None:
        workers.stop(deadline=deadline)
    service = app.extensions["img2img"]
    service.pool.close()
    app.extensions["img2img_jobs"].shutdown()
    service.shrinker.close()  # a finished run's uploads are made small first (2 s at most)
    for backend in service.pool.backends:
        backend.client.close()


def create_app(config: Config | None = None, *, client: comfy_client.ComfyClient | None = None) -> Flask:
    """Build the app. Tests pass their own Config (directories, ComfyUI address); without one
    (a WSGI server importing the app) it is read from the environment now."""
    if config is None:
        env = Environment()
        config = Config.from_env(env)
        env.log_warnings()
    app = Flask(__name__, static_folder=None)
    app.request_class = FormRequest  # invalid UTF-8 in a multipart field is refused, not replaced
    app.url_map.merge_slashes = False  # no HTML redirects; "//etc/passwd" is simply not found
    app.debug = False  # Flask would read FLASK_DEBUG from the environment: never a debugger here
    app.config.update(IMG2IMG=config, MAX_CONTENT_LENGTH=config.max_content_length,
                      MAX_FORM_MEMORY_SIZE=config.max_content_length)
    app.json.sort_keys = False  # answers in the order they are built (Flask 2.3+ ignores JSON_SORT_KEYS)
    client = client or comfy_client.ComfyClient(config.comfy_api_url)
    service = Img2ImgService(config, client, _served_images(config), backend_pool(config, client))
    app.extensions["img2img"] = service
    app.extensions["img2img_jobs"] = store = _job_store(config, service)
    app.extensions["img2img_workers"] = workers = _queue_workers(config, service)
    app.extensions["img2img_disconnects"] = DisconnectWatch()
    app.extensions["img2img_long_requests"] = LongRequests(config.threads)
    if workers is not None:
        store.local = workers  # a synchronous request may run here at once (RedisJobStore.generate)
    CORS(app, origins=list(config.cors_origins), methods=["GET", "POST", "OPTIONS"],
         allow_headers=["Content-Type", "Authorization", "X-API-Key", "Prefer"], max_age=600)
    app.before_request(only_from_allowed_origins(config.cors_origins))
    app.after_request(no_sniffing)
    if config.api_key:
        _require_api_key(app, config.api_key)
    register_error_handlers(app)
    app.register_blueprint(bp)
    return app


def main(argv=None) -> int:
    env = Environment()
    try:
        config = Config.from_env(env)
    except ConfigError as exc:
        return report("img2img_server", exc)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env.log_warnings()
    from waitress.server import create_server

    allocator.tune_for_requests(env.snapshot())  # before the threads start: they take their arenas at once
    if config.redis_url and config.role == "worker":
        # caught before the queue workers start taking jobs: a stop then lets their jobs finish
        with graceful_stop.SignalWait() as signals:
            return _work_until_stopped(create_app(config), config, signals)
    # caught before the queue workers start (with REDIS_URL they take jobs at once): a SIGTERM
    # while the service starts then stops it gracefully once it has, and their jobs finish
    stopping = graceful_stop.GracefulStop()
    app = create_app(config)
    client = app.extensions["img2img"].client
    mode = (f"copying uploads into {config.comfyui_input_dir}" if config.comfyui_input_dir
            else "uploading inputs over HTTP (no shared disk)")
    log.info("img2img service on http://%s:%d — ComfyUI at %s (%s), %s", config.host, config.port,
             config.comfy_api_url, "reachable" if client.is_up() else "NOT reachable yet", mode)
    # Everything loaded so far lives as long as the process: keep the cyclic garbage collector
    # from walking it again in every full collection (a pause of milliseconds, mid-request).
    gc.freeze()
    server = create_server(app, **server_options(config))
    server.print_listen("Serving on http://{}:{}")
    workers = app.extensions["img2img_workers"]
    # SIGTERM / Ctrl-C: no new connections or jobs, requests in progress answer (docs/scaling.md)
    # (without REDIS_URL, requests still running after the grace period are cancelled, so that
    # they answer 409 before their connections close; with it, their jobs run on elsewhere)
    stopping.serve(server, workers.request_stop if workers else lambda: None,
                   on_overdue=None if config.redis_url else lambda: _cancel_leftovers(app))
    server.run()  # until the graceful stop closes it
    deadline = stopping.deadline
    if deadline is not None:
        server.task_dispatcher.shutdown(timeout=max(0.0, deadline - time.monotonic()))
    if not config.redis_url:
        _cancel_leftovers(app)
        _wait_for_runs(app, graceful_stop.LAST_WORDS_S)
    shutdown(app, deadline=deadline)
    return 0


def _wait_for_runs(app: Flask, timeout: float) -> None:
    """Cancelled runs end by removing their inputs from ComfyUI's folder: let them, before the
    process (and its daemon threads) ends."""
    active, until = app.extensions["img2img"].active, time.monotonic() + timeout
    while len(active) and time.monotonic() < until:
        time.sleep(0.05)


def _cancel_leftovers(app: Flask) -> None:
    """In-process jobs end with the process: their prompts, and those of requests still waiting,
    are cancelled on ComfyUI rather than left to run for nobody (with REDIS_URL another replica
    runs such jobs again, and cancels the lost prompts itself)."""
    try:
        stopped = app.extensions["img2img"].interrupt()["interrupted"]
    except ComfyError as exc:
        log.warning("could not cancel this service's prompts on ComfyUI while stopping: %s", exc)
        return
    if stopped:
        log.info("stopped this service's prompts on ComfyUI: %s", ", ".join(stopped))


def server_options(config: Config) -> dict:
    """waitress's settings for the service (also benchmarks/http_hop.py's, so that it measures
    the same server)."""
    return dict(host=config.host, port=config.port, threads=config.threads, ident="dreamlayer-img2img",
                max_request_body_size=config.max_content_length + 1024 * 1024,
                # 256 KiB reads and 16 MiB kept in memory before spooling: a 0.7 MB upload arrives in
                # 1.3 ms instead of 2.3 ms (waitress's defaults: 8 KiB reads, spooled over 512 KiB)
                recv_bytes=256 * 1024, inbuf_overflow=16 * 1024 * 1024,
                # read on while a request runs, so that a client that hangs up is noticed
                # (disconnects.py): its generation is cancelled
                channel_request_lookahead=1)


def _work_until_stopped(app: Flask, config: Config, signals: graceful_stop.SignalWait) -> int:
    """IMG2IMG_ROLE=worker: no HTTP server, only the queue workers, until SIGTERM or Ctrl-C (a
    running job finishes first; a killed worker's job is run again by another)."""
    workers = app.extensions["img2img_workers"]
    log.info("img2img queue worker: %d worker threads on %s, ComfyUI at %s", workers.count,
             describe_redis(config.redis_url), ", ".join(config.comfy_api_urls))
    gc.freeze()
    signum = signals.wait()
    log.info("%s: stopping the queue workers (running jobs finish first)", signum.name)
    shutdown(app)
    return 0


def describe_redis(url: str) -> str:
    from dreamlayer.jobs.records import describe

    return describe(url)


if __name__ == "__main__":
    sys.exit(main())
