"""The :5002 routes behind the buttons of DreamLayer's page (dreamlayer/backend/page_routes.py): one
test per control with the page's exact request (as DreamLayer's frontend sends it: cross-origin, JSON
or a browser's multipart body in the page's part order), the answer fields the page reads, and the
security cases (names that lead out of the folders, show-in-folder for remote clients, uploads of
the wrong kind or size, API keys never echoed or logged, owner-only key file), CORS preflights."""
from __future__ import annotations

import io
import dataclasses
import json
import logging
import os
import stat
import sys
import uuid

import pytest
import requests
from PIL import Image
from werkzeug.http import parse_options_header

from dreamlayer.backend import api_keys, images as backend_images, model_uploads, prompts
from dreamlayer.backend.app import create_app
from dreamlayer.config.backend import DreamLayerConfig
from dreamlayer.config.img2img import Config, ConfigError
from service_fixtures import LiveServer, port_of

FRONTEND = "http://localhost:8080"
PAGE = {"Origin": FRONTEND}  # every request of the page is cross-origin
KEY = "sk-test_0123456789abcdefXYZ"


def png_bytes(size=(8, 8), color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "GIF")
    return buf.getvalue()


def browser_multipart(parts) -> tuple[bytes, str]:
    """A body as Chromium builds it from the page's FormData, parts in the page's order:
    (name, value) for a text part, (name, (filename, bytes, content type)) for a file."""
    boundary = "----WebKitFormBoundary" + uuid.uuid4().hex[:16]
    out = io.BytesIO()
    for name, value in parts:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def comfy_dir(tmp_path):
    root = tmp_path / "ComfyUI"
    for sub in ("models/checkpoints", "models/loras", "input", "output"):
        (root / sub).mkdir(parents=True)
    return root


@pytest.fixture
def cfg(tmp_path, comfy_dir, reserve_port, server_socket):
    return DreamLayerConfig(
        shared=Config(comfy_api_url=f"http://127.0.0.1:{reserve_port()}", comfyui_dir=comfy_dir,
                      comfyui_input_dir=comfy_dir / "input", comfyui_output_dir=comfy_dir / "output",
                      served_images_dir=tmp_path / "served", cors_origins=(FRONTEND, "http://127.0.0.1:8080")),
        port=port_of(server_socket), settings_file=tmp_path / "data" / "settings.json",
        display_names_file=tmp_path / "data" / "names.json", log_dir=tmp_path / "logs",
        api_keys_file=tmp_path / "data" / "api_keys.json", max_model_bytes=4096)


class Opener:
    """Stands in for the desktop's file manager: records what it was asked to open."""

    def __init__(self):
        self.calls = []

    def __call__(self, folder, file):
        self.calls.append((folder, file))
        return True


@pytest.fixture
def opener():
    return Opener()


@pytest.fixture
def app(cfg, opener):
    app = create_app(cfg)
    app.config["FOLDER_OPENER"] = opener
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def served(cfg):
    """A generated image in the served folder, as the img2img service leaves it."""
    data = png_bytes()
    cfg.shared.served_images_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.shared.served_images_dir / "img2img_abc_0_00001_.png"
    path.write_bytes(data)
    return path


def post_json(client, url, body, **kw):
    return client.post(url, data=json.dumps(body), headers={**PAGE, "Content-Type": "application/json"}, **kw)


def upload_model(client, filename, data, model_type="checkpoints", ctype="application/octet-stream", **kw):
    body, content_type = browser_multipart([("file", (filename, data, ctype)), ("model_type", model_type)])
    return client.post("/api/upload-model", data=body, content_type=content_type, headers=PAGE, **kw)


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if p.name.startswith(".")]


# ---------------------------------------------------------------------------- Add Random

@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_add_random_gets_a_prompt_of_our_own_lists(client, kind):
    resp = client.get(f"/api/fetch-prompt?type={kind}", headers=PAGE)
    assert resp.status_code == 200 and resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    body = resp.get_json()
    assert body["status"] == "success" and body["type"] == kind
    parts = body["prompt"].split(", ")
    if kind == "positive":  # a subject, a medium, a light, a detail (none contains ", ")
        assert len(parts) == 4 and parts[0] in prompts.SUBJECTS and parts[1] in prompts.MEDIA
        assert parts[2] in prompts.LIGHTS and parts[3] in prompts.DETAILS
    else:
        assert 5 <= len(parts) <= 8 and set(parts) <= set(prompts.NEGATIVE_TERMS) and len(set(parts)) == len(parts)


def test_random_prompts_vary_and_can_be_seeded():
    import random
    assert prompts.random_prompt("positive", random.Random(1)) == prompts.random_prompt("positive", random.Random(1))
    assert len({prompts.random_prompt("positive", random.Random(i)) for i in range(20)}) > 10


@pytest.mark.parametrize("query", ["", "?type=", "?type=neutral", "?type=POSITIVE"])
def test_fetch_prompt_needs_a_known_type(client, query):
    resp = client.get(f"/api/fetch-prompt{query}", headers=PAGE)
    assert resp.status_code == 400
    body = resp.get_json()
    assert (body["code"], body["field"], body["allowed"]) == ("invalid_parameter", "type", ["positive", "negative"])


# ---------------------------------------------------------------------------- Add API KEY

def test_add_api_key_stores_it_owner_only_and_never_echoes_or_logs_it(client, cfg, caplog):
    caplog.set_level(logging.DEBUG)
    resp = post_json(client, "/api/add-api-key", {"alias": "BFL_API_KEY", "api-key": KEY})
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "success", "message": "BFL_API_KEY saved", "alias": "BFL_API_KEY"}
    assert KEY not in resp.get_data(as_text=True) and KEY not in caplog.text
    assert "BFL_API_KEY" in caplog.text  # what was done is logged, the key is not
    assert json.loads(cfg.api_keys_file.read_text()) == {"BFL_API_KEY": KEY}
    if sys.platform != "win32":
        assert stat.S_IMODE(cfg.api_keys_file.stat().st_mode) == 0o600
    # a second key keeps the first; a new value replaces the old one
    assert post_json(client, "/api/add-api-key", {"alias": "OPENAI_API_KEY", "api-key": "sk-other"}).status_code == 200
    assert post_json(client, "/api/add-api-key", {"alias": "BFL_API_KEY", "api-key": "bfl-new"}).status_code == 200
    assert json.loads(cfg.api_keys_file.read_text()) == {"BFL_API_KEY": "bfl-new", "OPENAI_API_KEY": "sk-other"}
    assert api_keys.ApiKeyStore(cfg.api_keys_file).aliases() == ["BFL_API_KEY", "OPENAI_API_KEY"]
    assert leftovers(cfg.api_keys_file.parent) == []


def test_a_key_file_readable_by_others_becomes_owner_only(client, cfg):
    cfg.api_keys_file.parent.mkdir(parents=True)
    cfg.api_keys_file.write_text('{"GEMINI_API_KEY": "g-1"}')
    os.chmod(cfg.api_keys_file, 0o644)
    assert post_json(client, "/api/add-api-key", {"alias": "STABILITY_API_KEY", "api-key": "st-1"}).status_code == 200
    assert json.loads(cfg.api_keys_file.read_text()) == {"GEMINI_API_KEY": "g-1", "STABILITY_API_KEY": "st-1"}
    if sys.platform != "win32":
        assert stat.S_IMODE(cfg.api_keys_file.stat().st_mode) == 0o600


def test_a_broken_key_file_is_replaced_without_quoting_it(client, cfg, caplog):
    caplog.set_level(logging.DEBUG)
    cfg.api_keys_file.parent.mkdir(parents=True)
    cfg.api_keys_file.write_text('{"BFL_API_KEY": "half-written-secret')
    assert post_json(client, "/api/add-api-key", {"alias": "IDEOGRAM_API_KEY", "api-key": KEY}).status_code == 200
    assert json.loads(cfg.api_keys_file.read_text()) == {"IDEOGRAM_API_KEY": KEY}
    assert "half-written-secret" not in caplog.text and KEY not in caplog.text and "unreadable" in caplog.text


@pytest.mark.parametrize("body, code, field", [
    ({"alias": "AWS_SECRET_ACCESS_KEY", "api-key": KEY}, "unknown_api_key_alias", "alias"),
    ({"alias": "../BFL_API_KEY", "api-key": KEY}, "unknown_api_key_alias", "alias"),
    ({"api-key": KEY}, "unknown_api_key_alias", "alias"),
    ({"alias": "BFL_API_KEY"}, "invalid_api_key", "api-key"),
    ({"alias": "BFL_API_KEY", "api-key": "   "}, "invalid_api_key", "api-key"),
    ({"alias": "BFL_API_KEY", "api-key": ["x"]}, "invalid_api_key", "api-key"),
    ({"alias": "BFL_API_KEY", "api-key": KEY + "\nBFL=other"}, "invalid_api_key", "api-key"),
    ({"alias": "BFL_API_KEY", "api-key": KEY + " two"}, "invalid_api_key", "api-key"),
    ({"alias": "BFL_API_KEY", "api-key": KEY * 200}, "invalid_api_key", "api-key"),
])
def test_bad_api_key_posts_are_400_without_the_key_in_the_answer_or_log(client, cfg, caplog, body, code, field):
    caplog.set_level(logging.DEBUG)
    resp = post_json(client, "/api/add-api-key", body)
    assert resp.status_code == 400
    got = resp.get_json()
    assert (got["code"], got["field"]) == (code, field)
    assert KEY not in resp.get_data(as_text=True) and KEY not in caplog.text
    assert not cfg.api_keys_file.exists()


@pytest.mark.parametrize("kwargs", [
    {"data": json.dumps({"alias": "BFL_API_KEY", "api-key": KEY}), "content_type": "text/plain"},  # a CSRF form post
    {"data": "alias=BFL_API_KEY&api-key=" + KEY, "content_type": "application/x-www-form-urlencoded"},
    {"data": "[1]", "content_type": "application/json"},
])
def test_add_api_key_takes_only_a_json_object(client, cfg, kwargs):
    resp = client.post("/api/add-api-key", **kwargs)
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_json"
    assert KEY not in resp.get_data(as_text=True) and not cfg.api_keys_file.exists()


# ---------------------------------------------------------------------------- model drop zone

def test_dropping_a_model_writes_it_into_comfyuis_folder_for_its_type(client, comfy_dir):
    data = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(1000)
    resp = upload_model(client, "My Style (v2).safetensors", data, model_type="loras")
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    target = comfy_dir / "models" / "loras" / "My_Style_v2_.safetensors"
    assert body == {"status": "success", "message": "Model uploaded to loras: My_Style_v2_.safetensors",
                    "filename": "My_Style_v2_.safetensors", "original_filename": "My Style (v2).safetensors",
                    "display_name": "My Style V2", "model_type": "loras", "filepath": str(target), "size": len(data)}
    assert target.read_bytes() == data
    if sys.platform != "win32":  # readable by a ComfyUI running as another user, like a copied file
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(comfy_dir / "models") == []


def test_a_model_type_folder_comfyui_has_not_created_yet_is_created(client, comfy_dir):
    assert upload_model(client, "x.pt", b"abc", model_type="hypernetworks").status_code == 200
    assert (comfy_dir / "models" / "hypernetworks" / "x.pt").read_bytes() == b"abc"


def test_the_models_directory_setting_wins_over_comfyui_dir(client, tmp_path, comfy_dir):
    base = tmp_path / "base"
    (base / "models").mkdir(parents=True)
    assert client.post("/api/settings/paths", json={"modelsDirectory": str(base)}).status_code == 200
    resp = upload_model(client, "sdxl.safetensors", b"abc")
    assert resp.get_json()["filepath"] == str(base / "models" / "checkpoints" / "sdxl.safetensors")
    assert not (comfy_dir / "models" / "checkpoints" / "sdxl.safetensors").exists()


def test_an_existing_model_is_never_replaced(client, comfy_dir):
    existing = comfy_dir / "models" / "checkpoints" / "base.ckpt"
    existing.write_bytes(b"original")
    resp = upload_model(client, "base.ckpt", b"new")
    assert resp.status_code == 409
    assert (resp.get_json()["code"], resp.get_json()["filename"]) == ("model_exists", "base.ckpt")
    assert existing.read_bytes() == b"original" and leftovers(comfy_dir / "models") == []


@pytest.mark.parametrize("filename, status, code", [
    ("notes.txt", 415, "unsupported_model_file"),
    ("model.safetensors.exe", 415, "unsupported_model_file"),
    ("model", 415, "unsupported_model_file"),
    (".safetensors", 415, "unsupported_model_file"),
    ("evil.pkl", 415, "unsupported_model_file"),
])
def test_unknown_extensions_are_refused_before_anything_is_written(client, comfy_dir, filename, status, code):
    resp = upload_model(client, filename, b"abc")
    assert (resp.status_code, resp.get_json()["code"]) == (status, code)
    assert resp.get_json()["allowed"] == list(model_uploads.MODEL_EXTENSIONS)
    assert list((comfy_dir / "models").rglob("*.*")) == [] and leftovers(comfy_dir / "models") == []


@pytest.mark.parametrize("filename, stored", [
    ("../../../etc/evil.safetensors", "evil.safetensors"),
    ("..\\..\\windows\\evil.ckpt", "windowsevil.ckpt"),  # the quoted header's backslashes are escapes
    ("/abs/path/model.PTH", "model.pth"),
    ("...hidden.bin", "hidden.bin"),
    ("-rf x.safetensors", "rf_x.safetensors"),
    ("modèle été.safetensors", "mod_le_t_.safetensors"),
])
def test_upload_names_are_made_safe_and_stay_in_the_type_folder(client, comfy_dir, filename, stored):
    resp = upload_model(client, filename, b"abc")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["filename"] == stored
    assert (comfy_dir / "models" / "checkpoints" / stored).read_bytes() == b"abc"


def test_unknown_model_type_is_400_and_leaves_nothing(client, comfy_dir):
    resp = upload_model(client, "x.safetensors", b"abc", model_type="../../input")
    body = resp.get_json()
    assert (resp.status_code, body["code"], body["field"]) == (400, "invalid_model_type", "model_type")
    assert "checkpoints" in body["allowed"] and "hypernetworks" in body["allowed"]
    assert list((comfy_dir / "models").rglob("*.*")) == [] and leftovers(comfy_dir / "models") == []


def test_a_model_over_the_size_limit_is_413_and_leaves_nothing(client, comfy_dir):
    resp = upload_model(client, "big.safetensors", b"x" * 5000)  # limit 4096 in this config
    assert (resp.status_code, resp.get_json()["code"], resp.get_json()["maximum"]) == (413, "model_too_large", 4096)
    assert list((comfy_dir / "models").rglob("*.*")) == [] and leftovers(comfy_dir / "models") == []


def test_a_body_cut_short_leaves_nothing(client, comfy_dir):
    body, ctype = browser_multipart([("file", ("cut.safetensors", b"y" * 2000, "application/octet-stream")),
                                     ("model_type", "checkpoints")])
    resp = client.post("/api/upload-model", data=body[:1500], content_type=ctype, headers=PAGE)
    assert resp.status_code == 400 and resp.get_json()["code"] == "missing_file"
    assert list((comfy_dir / "models").rglob("*.*")) == [] and leftovers(comfy_dir / "models") == []


@pytest.mark.parametrize("parts", [[("model_type", "loras")],
                                   [("file", ("empty.safetensors", b"", "application/octet-stream"))],
                                   [("file", ("", b"", "application/octet-stream"))]])
def test_no_file_or_an_empty_one_is_400(client, comfy_dir, parts):
    body, ctype = browser_multipart(parts)
    resp = client.post("/api/upload-model", data=body, content_type=ctype, headers=PAGE)
    assert (resp.status_code, resp.get_json()["code"]) == (400, "missing_file")
    assert leftovers(comfy_dir / "models") == []


def test_without_a_known_models_folder_the_upload_says_what_to_set(cfg, opener):
    app = create_app(cfg.replace(shared=cfg.shared.replace(comfyui_dir=None)))
    resp = upload_model(app.test_client(), "x.safetensors", b"abc")
    assert (resp.status_code, resp.get_json()["code"]) == (503, "models_dir_unknown")
    assert "COMFYUI_DIR" in resp.get_json()["message"]


def test_a_full_disk_is_507_and_leaves_nothing(client, comfy_dir, monkeypatch):
    def no_space(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model_uploads, "_place", no_space)
    resp = upload_model(client, "x.safetensors", b"abc")
    assert (resp.status_code, resp.get_json()["code"]) == (507, "disk_full")
    assert list((comfy_dir / "models").rglob("*.*")) == [] and leftovers(comfy_dir / "models") == []


def test_a_type_folder_on_another_disk_gets_a_copy_first(client, comfy_dir, monkeypatch):
    monkeypatch.setattr(model_uploads, "_same_disk", lambda a, b: False)
    assert upload_model(client, "far.safetensors", b"abc").status_code == 200
    assert (comfy_dir / "models" / "checkpoints" / "far.safetensors").read_bytes() == b"abc"
    assert leftovers(comfy_dir / "models") == []


def test_without_hard_links_the_model_is_renamed_into_place_and_still_never_replaces(client, comfy_dir, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(model_uploads.os, "link", no_links)
    assert upload_model(client, "fat.safetensors", b"abc").status_code == 200
    assert (comfy_dir / "models" / "checkpoints" / "fat.safetensors").read_bytes() == b"abc"
    resp = upload_model(client, "fat.safetensors", b"other")
    assert (resp.status_code, resp.get_json()["code"]) == (409, "model_exists")
    assert (comfy_dir / "models" / "checkpoints" / "fat.safetensors").read_bytes() == b"abc"
    assert leftovers(comfy_dir / "models") == []


def test_a_model_upload_over_a_real_socket(cfg, app, comfy_dir, server_socket):
    """waitress hands the body over in pieces: the stream goes to disk as it comes."""
    server = LiveServer(app, server_socket).start()
    try:
        data = os.urandom(3000)
        body, ctype = browser_multipart([("file", ("real.safetensors", data, "application/octet-stream")),
                                         ("model_type", "controlnet")])
        resp = requests.post(f"{server.url}/api/upload-model", data=body, timeout=10,
                             headers={**PAGE, "Content-Type": ctype})
        assert resp.status_code == 200 and resp.headers["Access-Control-Allow-Origin"] == FRONTEND
        assert (comfy_dir / "models" / "controlnet" / "real.safetensors").read_bytes() == data
    finally:
        server.stop()


def test_safe_model_name_rules():
    assert model_uploads.safe_model_name("a b/c d.SafeTensors") == "c_d.safetensors"
    assert model_uploads.safe_model_name("x" * 300 + ".ckpt") == "x" * 150 + ".ckpt"
    assert model_uploads.safe_model_name("___.bin") == "model.bin"
    assert model_uploads.safe_model_name("nul.safetensors") == "model_nul.safetensors"


# ---------------------------------------------------------------------------- ControlNet image

def test_a_controlnet_image_is_stored_in_comfyuis_input_folder(client, comfy_dir):
    body, ctype = browser_multipart([("file", ("pose.png", png_bytes((16, 12)), "image/png")), ("unit_index", "1")])
    resp = client.post("/api/upload-controlnet-image", data=body, content_type=ctype, headers=PAGE)
    assert resp.status_code == 200, resp.get_json()
    got = resp.get_json()
    assert got["status"] == "success" and got["unit_index"] == 1 and (got["width"], got["height"]) == (16, 12)
    assert backend_images.CONTROLNET_NAME.match(got["filename"]) and got["filename"].startswith("controlnet_unit_1_")
    stored = comfy_dir / "input" / got["filename"]
    assert got["filepath"] == str(stored) and got["size"] == stored.stat().st_size
    assert Image.open(stored).size == (16, 12)
    # the page previews it at <backend>/api/images/<filename>
    assert got["url"] == f"http://localhost/api/images/{got['filename']}"
    preview = client.get(f"/api/images/{got['filename']}", headers=PAGE)
    assert preview.status_code == 200 and preview.mimetype == "image/png" and preview.data == stored.read_bytes()
    assert leftovers(comfy_dir / "input") == []


@pytest.mark.parametrize("parts, status, code", [
    ([("file", ("x.png", b"not an image", "image/png")), ("unit_index", "0")], 400, "invalid_image"),
    ([("file", ("x.gif", gif_bytes(), "image/gif")), ("unit_index", "0")], 415, "unsupported_image_type"),
    ([("unit_index", "0")], 400, "missing_image"),
    ([("file", ("x.png", png_bytes(), "image/png")), ("unit_index", "../1")], 400, "invalid_parameter"),
    ([("file", ("x.png", png_bytes(), "image/png")), ("unit_index", "100")], 400, "invalid_parameter"),
    # digits int() refuses (superscript: was a 500) or reads as another number (Arabic-Indic 3)
    ([("file", ("x.png", png_bytes(), "image/png")), ("unit_index", "\u00b9")], 400, "invalid_parameter"),
    ([("file", ("x.png", png_bytes(), "image/png")), ("unit_index", "\u0663")], 400, "invalid_parameter"),
])
def test_bad_controlnet_uploads_are_refused_and_leave_nothing(client, comfy_dir, parts, status, code):
    body, ctype = browser_multipart(parts)
    resp = client.post("/api/upload-controlnet-image", data=body, content_type=ctype, headers=PAGE)
    assert (resp.status_code, resp.get_json()["code"]) == (status, code)
    assert list((comfy_dir / "input").iterdir()) == []


def test_a_controlnet_image_over_the_pixel_limit_is_413(cfg, opener, comfy_dir):
    app = create_app(cfg.replace(shared=cfg.shared.replace(max_image_pixels=100)))
    body, ctype = browser_multipart([("file", ("x.png", png_bytes((20, 20)), "image/png")), ("unit_index", "0")])
    resp = app.test_client().post("/api/upload-controlnet-image", data=body, content_type=ctype, headers=PAGE)
    assert (resp.status_code, resp.get_json()["code"]) == (413, "image_too_large")
    assert list((comfy_dir / "input").iterdir()) == []


def test_a_controlnet_upload_of_too_many_parts_says_so(client, comfy_dir):
    """A small body of 1500 parts was told it was "larger than 67108864 bytes"."""
    fields = [("file", ("x.png", png_bytes(), "image/png"))] + [(f"f{i}", "x") for i in range(1500)]
    body, ctype = browser_multipart(fields)
    resp = client.post("/api/upload-controlnet-image", data=body, content_type=ctype, headers=PAGE)
    assert (resp.status_code, resp.get_json()["code"]) == (413, "request_too_large")
    assert "more than 1000 parts" in resp.get_json()["message"]
    assert list((comfy_dir / "input").iterdir()) == []


def test_a_controlnet_image_needs_a_known_input_folder(cfg, opener):
    app = create_app(cfg.replace(shared=cfg.shared.replace(comfyui_dir=None, comfyui_input_dir=None)))
    body, ctype = browser_multipart([("file", ("x.png", png_bytes(), "image/png")), ("unit_index", "0")])
    resp = app.test_client().post("/api/upload-controlnet-image", data=body, content_type=ctype, headers=PAGE)
    assert (resp.status_code, resp.get_json()["code"]) == (503, "comfyui_input_unknown")
    assert "COMFYUI_DIR" in resp.get_json()["message"]


def test_only_our_controlnet_uploads_are_served_from_the_input_folder(client, comfy_dir):
    (comfy_dir / "input" / "someone_elses.png").write_bytes(png_bytes())
    (comfy_dir / "input" / "controlnet_unit_0_00000000000000zz.png").write_bytes(png_bytes())
    for name in ("someone_elses.png", "controlnet_unit_0_00000000000000zz.png"):
        assert client.get(f"/api/images/{name}").status_code == 404, name


# ---------------------------------------------------------------------------- Show in Folder

def test_show_in_folder_opens_the_folder_for_a_local_client(client, served, opener):
    resp = post_json(client, "/api/show-in-folder", {"filename": served.name})
    assert resp.status_code == 200
    body = resp.get_json()
    folder = served.parent.resolve()
    assert body == {"status": "success", "message": f"Opened the folder of {served.name}: {folder}",
                    "filename": served.name, "folder": str(folder), "filepath": str(served.resolve()),
                    "opened": True}
    assert opener.calls == [(folder, served.resolve())]


def test_show_in_folder_runs_nothing_for_a_remote_client(client, served, opener):
    resp = client.post("/api/show-in-folder", json={"filename": served.name}, headers=PAGE,
                       environ_base={"REMOTE_ADDR": "10.0.0.5"})
    body = resp.get_json()
    assert resp.status_code == 200 and body["opened"] is False
    assert body["folder"] == str(served.parent.resolve()) and "not opened" in body["message"]
    assert opener.calls == []


def test_show_in_folder_with_opening_turned_off(cfg, served):
    app = create_app(cfg.replace(open_folders=False))
    assert app.config["FOLDER_OPENER"] is None
    body = app.test_client().post("/api/show-in-folder", json={"filename": served.name}).get_json()
    assert body["opened"] is False and "DREAMLAYER_OPEN_FOLDERS" in body["message"]


def test_show_in_folder_finds_comfyuis_outputs_too(client, comfy_dir, opener):
    out = comfy_dir / "output" / "ComfyUI_00001_.png"
    out.write_bytes(png_bytes())
    body = post_json(client, "/api/show-in-folder", {"filename": out.name}).get_json()
    assert body["folder"] == str(out.parent.resolve()) and opener.calls == [(out.parent.resolve(), out.resolve())]


@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                               ("::ffff:127.0.0.1", True), ("10.0.0.5", False),
                                               ("192.168.1.2", False), ("::ffff:10.0.0.5", False), ("", False),
                                               (None, False), ("localhost", False)])
def test_is_loopback(address, loopback):
    assert backend_images.is_loopback(address) is loopback


def test_the_default_opener_command_per_platform(tmp_path, monkeypatch):
    f = tmp_path / "a.png"
    assert backend_images.folder_command(tmp_path, f, "darwin") == ["open", "-R", str(f)]
    assert backend_images.folder_command(tmp_path, f, "win32") == ["explorer", f"/select,{f}"]
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert backend_images.folder_command(tmp_path, f, "linux") is None  # no desktop: nothing to run


# ---------------------------------------------------------------------------- Send To

@pytest.mark.parametrize("route, tab", [("/api/send-to-extras", "extras"), ("/api/send-to-img2img", "img2img")])
def test_send_to_answers_success_and_the_image_url(client, served, route, tab):
    resp = post_json(client, route, {"filename": served.name})
    assert resp.status_code == 200 and resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert resp.get_json() == {"status": "success", "message": f"Image sent to {tab}", "filename": served.name,
                               "url": f"http://localhost/images/{served.name}"}
    # what the page does next: GET the image (an <img> or fetch().blob())
    image = client.get(f"/images/{served.name}", headers=PAGE)
    assert image.status_code == 200 and image.data == served.read_bytes()


ROUTES_WITH_A_FILENAME = ["/api/show-in-folder", "/api/send-to-extras", "/api/send-to-img2img"]


@pytest.mark.parametrize("route", ROUTES_WITH_A_FILENAME)
@pytest.mark.parametrize("name", ["../secret.png", "..%2Fsecret.png", "sub/inner.png", "/etc/passwd",
                                  "..\\secret.png", ".tmp-half.png", "", 42, None, ["a.png"], "a.png\n"])
def test_names_that_lead_out_are_400_and_run_nothing(client, served, opener, tmp_path, route, name):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    resp = post_json(client, route, {"filename": name})
    assert resp.status_code == 400, name
    assert (resp.get_json()["code"], resp.get_json()["field"]) == ("invalid_filename", "filename")
    assert opener.calls == []


@pytest.mark.parametrize("route", ROUTES_WITH_A_FILENAME)
def test_unknown_or_symlinked_out_names_are_404(client, cfg, served, opener, tmp_path, route):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (cfg.shared.served_images_dir / "link.png").symlink_to(tmp_path / "secret.png")
    for name in ("missing.png", "link.png"):
        resp = post_json(client, route, {"filename": name})
        assert (resp.status_code, resp.get_json()["code"]) == (404, "image_not_found"), name
    assert opener.calls == []


@pytest.mark.parametrize("route", ROUTES_WITH_A_FILENAME)
def test_filename_routes_take_only_a_json_object(client, route):
    for kwargs in ({"data": "filename=a.png"}, {"data": "[]", "content_type": "application/json"}):
        resp = client.post(route, **kwargs)
        assert (resp.status_code, resp.get_json()["code"]) == (400, "invalid_json")


@pytest.mark.parametrize("route", ["/api/send-to-img2img", "/api/add-api-key", "/api/settings/paths"])
def test_json_nested_too_deep_for_the_parser_is_400_not_500(client, route):
    resp = client.post(route, data='{"filename": ' + "[" * 5000 + "]" * 5000 + "}",
                       content_type="application/json")
    assert (resp.status_code, resp.get_json()["code"]) == (400, "invalid_json")


# ---------------------------------------------------------------------------- images, Download PNG

def test_images_route_downloads_and_still_shows_in_an_img(client, served):
    resp = client.get(f"/images/{served.name}", headers=PAGE)
    assert resp.status_code == 200 and resp.mimetype == "image/png" and resp.data == served.read_bytes()
    value, options = parse_options_header(resp.headers["Content-Disposition"])
    assert (value, options) == ("attachment", {"filename": served.name})
    assert resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    inline = client.get(f"/api/images/{served.name}")
    assert inline.status_code == 200 and parse_options_header(inline.headers["Content-Disposition"])[0] == "inline"


def test_images_ignore_a_range_they_cannot_serve(client, served):
    """As on :5004 (tests/test_image_downloads.py): RFC 9110 14.2, not Werkzeug's 416."""
    data = served.read_bytes()
    for header in ("items=0-1", "bytes=0-1,4-5", "bytes=x"):
        resp = client.get(f"/api/images/{served.name}", headers={"Range": header})
        assert resp.status_code == 200 and resp.data == data, header
    assert client.get(f"/api/images/{served.name}", headers={"Range": "bytes=1-3"}).data == data[1:4]


def test_images_route_serves_comfyuis_output_folder_too(client, comfy_dir):
    (comfy_dir / "output" / "ComfyUI_00002_.png").write_bytes(png_bytes())
    for prefix in ("/images/", "/api/images/"):
        assert client.get(prefix + "ComfyUI_00002_.png").status_code == 200


def test_nothing_outside_the_image_folders_is_served_by_images(client, cfg, comfy_dir, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (cfg.shared.served_images_dir / "link.png").symlink_to(tmp_path / "secret.png")
    (comfy_dir / "output" / "sub").mkdir()
    (comfy_dir / "output" / "sub" / "inner.png").write_bytes(png_bytes())
    (comfy_dir / "output" / "notes.txt").write_text("x")
    (comfy_dir / "models" / "checkpoints" / "m.png").write_bytes(png_bytes())
    for name in ["../secret.png", "..%2Fsecret.png", "%2e%2e/secret.png", str(tmp_path / "secret.png"), "link.png",
                 "sub/inner.png", "notes.txt", "m.png", "../models/checkpoints/m.png", "..\\secret.png"]:
        resp = client.get(f"/images/{name}")
        assert resp.status_code == 404 and resp.get_json()["status"] == "error", name


def test_files_that_are_not_raster_images_are_neither_served_shown_nor_sent(client, cfg, comfy_dir, opener):
    """An SVG (which may hold script, on this origin) or a text file in the image folders: GET,
    Show in Folder and Send To all answer 404 image_not_found, as for a name that is not there."""
    (comfy_dir / "output" / "notes.txt").write_text("x")
    (cfg.shared.served_images_dir / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    for name in ("notes.txt", "drawing.svg"):
        assert client.get(f"/api/images/{name}").status_code == 404
        for route in ("/api/show-in-folder", "/api/send-to-img2img", "/api/send-to-extras"):
            resp = client.post(route, json={"filename": name}, headers=PAGE)
            assert (resp.status_code, resp.get_json()["code"]) == (404, "image_not_found"), (route, name)
    assert opener.calls == []


def test_images_over_a_real_socket_with_traversal(cfg, app, served, tmp_path, server_socket):
    import http.client
    (tmp_path / "secret.png").write_bytes(png_bytes())
    server = LiveServer(app, server_socket).start()
    conn = http.client.HTTPConnection("127.0.0.1", cfg.port, timeout=5)
    try:
        for target in ["/images/../../secret.png", "/images/..%2f..%2fsecret.png", "/images//etc/passwd"]:
            conn.request("GET", target)
            resp = conn.getresponse()
            assert resp.status == 404 and json.loads(resp.read())["status"] == "error", target
        conn.request("GET", f"/images/{served.name}")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Type")) == (200, "image/png")
        assert resp.getheader("Content-Disposition") == f"attachment; filename={served.name}"
        resp.read()
    finally:
        conn.close()
        server.stop()


# ---------------------------------------------------------------------------- CORS, origins

PAGE_ROUTES = [("GET", "/api/fetch-prompt?type=positive"), ("POST", "/api/add-api-key"),
               ("POST", "/api/settings/paths"),
               ("POST", "/api/upload-model"), ("POST", "/api/upload-controlnet-image"),
               ("POST", "/api/show-in-folder"), ("POST", "/api/send-to-extras"), ("POST", "/api/send-to-img2img"),
               ("GET", "/images/x.png"), ("GET", "/api/images/x.png")]


@pytest.mark.parametrize("method, url", PAGE_ROUTES)
def test_every_page_route_answers_the_preflight_for_the_page_only(client, method, url):
    ask = {"Access-Control-Request-Method": method, "Access-Control-Request-Headers": "content-type"}
    resp = client.options(url, headers={**PAGE, **ask})
    assert resp.status_code == 200, url
    assert resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert method in resp.headers["Access-Control-Allow-Methods"]
    assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
    other = client.options(url, headers={"Origin": "http://evil.example", **ask})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize("url", [u for m, u in PAGE_ROUTES if m == "POST"])
def test_posts_from_another_site_are_403_and_change_nothing(client, cfg, comfy_dir, served, url):
    body, ctype = browser_multipart([("file", ("x.safetensors", b"abc", "application/octet-stream")),
                                     ("model_type", "checkpoints")])
    resp = client.post(url, data=body, content_type=ctype, headers={"Origin": "http://evil.example"})
    assert (resp.status_code, resp.get_json()["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert list((comfy_dir / "models").rglob("*.*")) == [] and not cfg.api_keys_file.exists()


def test_no_answer_is_content_sniffed(client, served):
    for resp in (client.get("/api/models"), client.get(f"/images/{served.name}"), client.get("/nope")):
        assert resp.headers["X-Content-Type-Options"] == "nosniff", resp.status


def test_cors_origins_star_lets_every_page_post(cfg):
    star = Config.from_env({"CORS_ORIGINS": "*"}).cors_origins
    client = create_app(dataclasses.replace(cfg, shared=cfg.shared.replace(cors_origins=star))).test_client()
    resp = client.post("/api/add-api-key", json={"alias": "OPENAI_API_KEY", "api-key": "sk-test"},
                       headers={"Origin": "http://evil.example"})
    assert resp.status_code == 200, resp.get_json()


def test_preflight_over_a_real_port(cfg, app, server_socket):
    server = LiveServer(app, server_socket).start()
    try:
        resp = requests.options(f"{server.url}/api/upload-model", timeout=5, headers={
            **PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert resp.status_code == 200 and resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    finally:
        server.stop()


# ---------------------------------------------------------------------------- configuration

def test_configuration_of_the_page_routes(tmp_path):
    cfg = DreamLayerConfig.from_env({})
    assert cfg.max_model_bytes == 32 * 1024 ** 3 and cfg.open_folders is True
    assert cfg.api_keys_file.name == "api_keys.json" and cfg.api_keys_file.parent.name == "data"
    cfg = DreamLayerConfig.from_env({"DREAMLAYER_API_KEYS_FILE": str(tmp_path / "k.json"),
                                     "DREAMLAYER_MAX_MODEL_BYTES": "1000", "DREAMLAYER_OPEN_FOLDERS": "0"})
    assert (cfg.api_keys_file, cfg.max_model_bytes, cfg.open_folders) == (tmp_path / "k.json", 1000, False)
    for bad in ({"DREAMLAYER_MAX_MODEL_BYTES": "lots"}, {"DREAMLAYER_MAX_MODEL_BYTES": "0"}):
        with pytest.raises(ConfigError):
            DreamLayerConfig.from_env(bad)

