"""The routes behind the buttons of DreamLayer's page on :5002: "Add Random" (fetch-prompt), "Add API
KEY", the model drop zone (upload-model), "Show in Folder", "Send To" (send-to-img2img,
send-to-extras), a ControlNet unit's image (upload-controlnet-image), and the images themselves
(/images/<name>, /api/images/<name>). Handlers are thin: the work is in prompts, api_keys,
model_uploads, controlnet_uploads and images. The answers have the shapes the page reads
(docs/installation.md lists them).

POSTs that carry an ``Origin`` header must come from one of CORS_ORIGINS: a browser always sends
it on a cross-site POST, and multipart uploads need no CORS preflight, so without this check any
web page could write files into ComfyUI's folders through a visitor's browser. Clients without a
browser (curl) send no Origin and are not affected.
"""
from __future__ import annotations

import mimetypes

from flask import Blueprint, current_app, jsonify, request, send_file
from werkzeug.exceptions import RequestEntityTooLarge

from dreamlayer.backend import prompts
from dreamlayer.backend.api_keys import ApiKeyStore, check_key
from dreamlayer.backend.controlnet_uploads import save_controlnet_image, unit_index
from dreamlayer.backend.images import ImageNotFound, requested_filename, show_in_folder
from dreamlayer.backend.model_uploads import receive_model
from dreamlayer.errors import BadRequest, PayloadTooLarge, too_large_message
from dreamlayer.http_range import ignore_unusable_range

bp = Blueprint("dream_layer_page", __name__)


def _backend():
    return current_app.extensions["dream_layer"]


def json_object(what: str = "a JSON object") -> dict:
    """The request's JSON object; 400 ``invalid_json`` for anything else (nested too deep for
    Python's parser included: a RecursionError, not a 500)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest(f"Send {what} with Content-Type: application/json", code="invalid_json")
    return body


def _url(path: str) -> str:
    """An absolute URL on this backend, as the client addressed it."""
    return request.host_url.rstrip("/") + path


# ---------------------------------------------------------------------------- prompts, API keys

@bp.get("/api/fetch-prompt")
def fetch_prompt():
    kind = request.args.get("type")
    prompt = prompts.random_prompt(kind)
    return jsonify({"status": "success", "type": kind, "prompt": prompt, "message": f"A random {kind} prompt"})


@bp.post("/api/add-api-key")
def add_api_key():
    body = json_object()
    alias, key = check_key(body.get("alias"), body.get("api-key", body.get("api_key")))
    ApiKeyStore(_backend().config.api_keys_file).save(alias, key)
    return jsonify({"status": "success", "message": f"{alias} saved", "alias": alias})


# ---------------------------------------------------------------------------- uploads

@bp.post("/api/upload-model")
def upload_model():
    b = _backend()
    directories = b.directories()
    answer = receive_model(request.environ, models_dir=directories.models_dir, comfyui_dir=b.config.comfyui_dir,
                           max_bytes=b.config.max_model_bytes)
    return jsonify(answer)


@bp.post("/api/upload-controlnet-image")
def upload_controlnet_image():
    shared = _backend().config.shared
    request.max_content_length = shared.max_content_length
    try:
        file = request.files.get("file")
        unit = unit_index(request.form.get("unit_index"))
    except RequestEntityTooLarge:  # too many bytes, or too many parts: the message says which
        raise PayloadTooLarge(too_large_message(current_app, request) + " (MAX_CONTENT_LENGTH)",
                              maximum=shared.max_content_length) from None
    data = file.read() if file is not None else b""
    answer = save_controlnet_image(data, unit, input_dir=shared.comfyui_input_dir, max_pixels=shared.max_image_pixels)
    answer["url"] = _url(f"/api/images/{answer['filename']}")
    return jsonify(answer)


# ---------------------------------------------------------------------------- generated images

@bp.post("/api/show-in-folder")
def show_folder():
    path = _backend().images.generated(requested_filename(json_object()))
    return jsonify(show_in_folder(path, request.remote_addr, current_app.config.get("FOLDER_OPENER")))


def _send_to(tab: str):
    name = requested_filename(json_object())
    _backend().images.generated(name)
    return jsonify({"status": "success", "message": f"Image sent to {tab}", "filename": name,
                    "url": _url(f"/images/{name}")})


@bp.post("/api/send-to-img2img")
def send_to_img2img():
    return _send_to("img2img")


@bp.post("/api/send-to-extras")
def send_to_extras():
    return _send_to("extras")


@bp.get("/images/<path:filename>")
@bp.get("/api/images/<path:filename>")
def image(filename):
    """/images/ answers as a download (Content-Disposition: attachment), so the page's "Download
    PNG" link downloads instead of opening a tab; an <img> shows it all the same. /api/images/
    answers inline."""
    path = _backend().images.servable(filename)
    mimetype = mimetypes.guess_type(path.name)[0] if path is not None else None
    if path is None or not (mimetype or "").startswith("image/"):
        raise ImageNotFound(f"No image named {filename[:200]!r}")
    ignore_unusable_range(request)
    if request.path.startswith("/images/"):
        return send_file(path, mimetype=mimetype, max_age=3600, as_attachment=True, download_name=path.name)
    return send_file(path, mimetype=mimetype, max_age=3600)
