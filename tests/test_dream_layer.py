"""dream_layer.py (:5002) against the fake ComfyUI: the frontend's model lists, path settings,
served images, health, CORS and errors — over the Flask test client, and over a real port
(waitress) where the HTTP layer matters."""
from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from dreamlayer.config.img2img import Config, ConfigError
from dreamlayer.backend.app import create_app
from dreamlayer.config.backend import DreamLayerConfig
from service_fixtures import LiveServer, port_of

ROOT = Path(__file__).resolve().parent.parent
FRONTEND = "http://localhost:8080"


@pytest.fixture
def dl_config(fake_comfy, tmp_path, server_socket):
    return DreamLayerConfig(
        shared=Config(comfy_api_url=fake_comfy.url, served_images_dir=tmp_path / "served",
                      cors_origins=(FRONTEND, "http://127.0.0.1:8080")),
        port=port_of(server_socket), settings_file=tmp_path / "data" / "settings.json",
        display_names_file=tmp_path / "data" / "model_display_names.json", log_dir=tmp_path / "logs")


@pytest.fixture
def app(dl_config):
    return create_app(dl_config)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def live(app, server_socket):
    server = LiveServer(app, server_socket).start()
    yield server
    server.stop()


def png_bytes(size=(8, 8), color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- basics

def test_index_and_health(client, fake_comfy):
    assert client.get("/").get_json() == {"status": "ok", "service": "dream_layer"}
    body = client.get("/health").get_json()
    assert body["status"] == "ok"
    assert body["comfyui"] == {"url": fake_comfy.url, "reachable": True}
    assert body["directories"] == {"output_directory": None, "models_directory": None}


def test_health_without_comfyui_says_how_to_point_at_one(client, fake_comfy):
    fake_comfy.refuse_connections()
    resp = client.get("/health")
    assert resp.status_code == 200
    comfy = resp.get_json()["comfyui"]
    assert comfy["reachable"] is False
    assert "COMFY_API_URL" in comfy["hint"] and "COMFYUI_DIR" in comfy["hint"] and fake_comfy.url in comfy["hint"]


def test_health_in_demo_mode_labels_the_stand_in(dl_config):
    comfy = create_app(dl_config.replace(demo=True)).test_client().get("/health").get_json()["comfyui"]
    assert comfy["demo"] is True
    assert "no diffusion model" in comfy["note"]


def test_old_img2img_placeholder_does_not_exist(client):
    resp = client.post("/api/img2img", json={"prompt": "x"})
    assert resp.status_code == 404
    assert resp.get_json()["code"] == "not_found"


def test_wrong_method_is_json(client):
    resp = client.post("/api/models")
    assert resp.status_code == 405
    assert resp.get_json()["status"] == "error"


# ---------------------------------------------------------------------------- model lists

@pytest.mark.parametrize("path, filename, name", [
    ("/api/models", "tiny-sd15-random.safetensors", "Tiny Sd15 Random"),
    ("/api/lora-models", "tiny-lora-random.safetensors", "Tiny Lora Random"),
    ("/api/controlnet/models", "tiny-controlnet-random.safetensors", "Tiny Controlnet Random"),
])
def test_model_lists_have_the_frontend_shape(client, path, filename, name):
    body = client.get(path).get_json()
    assert body == {"status": "success", "models": [{"id": filename, "name": name, "filename": filename}]}


def test_upscaler_list_offers_the_built_in_methods_after_the_installed_models(client, fake_comfy):
    from dreamlayer.img2img.advanced_params import builtin_upscaler
    body = client.get("/api/upscaler-models").get_json()
    assert body["status"] == "success"
    ids = [m["id"] for m in body["models"]]
    assert ids[:3] == ["latent", "latent-antialiased", "latent-bicubic"] and "lanczos" in ids
    assert all(m["builtin"] is True and m["filename"] is None for m in body["models"])
    assert all(builtin_upscaler(i) is not None for i in ids)  # the img2img service takes each id
    fake_comfy.add_model("upscale_models", "4x-UltraSharp.pth")
    models = client.get("/api/upscaler-models").get_json()["models"]
    assert models[0] == {"id": "4x-UltraSharp.pth", "name": "4x Ultrasharp", "filename": "4x-UltraSharp.pth"}
    assert [m["id"] for m in models[1:]] == ids


@pytest.mark.parametrize("folder, path", [("checkpoints", "/api/models"), ("loras", "/api/lora-models"),
                                          ("upscale_models", "/api/upscaler-models"),
                                          ("controlnet", "/api/controlnet/models")])
def test_a_model_added_to_comfyui_shows_up_on_the_next_call(client, fake_comfy, folder, path):
    client.get(path)  # a first call must not pin an old list
    fake_comfy.add_model(folder, "added_model-v2.safetensors")
    models = client.get(path).get_json()["models"]
    assert {"id": "added_model-v2.safetensors", "name": "Added Model V2",
            "filename": "added_model-v2.safetensors"} in models


def test_display_names_file_overrides_derived_names(client, dl_config):
    dl_config.display_names_file.parent.mkdir(parents=True, exist_ok=True)
    dl_config.display_names_file.write_text(json.dumps({"tiny-sd15-random.safetensors": "Tiny SD 1.5"}))
    assert client.get("/api/models").get_json()["models"][0]["name"] == "Tiny SD 1.5"
    dl_config.display_names_file.write_text("{broken")  # a bad edit never breaks the page
    assert client.get("/api/models").get_json()["models"][0]["name"] == "Tiny Sd15 Random"


@pytest.mark.parametrize("path", ["/api/models", "/api/lora-models", "/api/upscaler-models", "/api/controlnet/models"])
def test_comfyui_unreachable_is_503_with_the_img2img_error_shape(client, fake_comfy, path):
    fake_comfy.refuse_connections()
    resp = client.get(path)
    assert resp.status_code == 503
    body = resp.get_json()
    assert set(body) == {"status", "code", "message", "url"}
    assert (body["status"], body["code"], body["url"]) == ("error", "comfyui_unreachable", fake_comfy.url)
    assert fake_comfy.url in body["message"]


def test_missing_node_class_gives_an_empty_list_with_a_warning(client, fake_comfy):
    del fake_comfy.object_info["UpscaleModelLoader"]
    body = client.get("/api/upscaler-models").get_json()
    assert body["status"] == "success" and all(m.get("builtin") for m in body["models"])
    assert "UpscaleModelLoader" in body["warnings"][0]


# ---------------------------------------------------------------------------- settings

#: What DreamLayer's Configurations page posts when the user changed only the output folder.
def frontend_payload(output_dir: str) -> dict:
    return {"outputDirectory": output_dir, "modelsDirectory": "/path/to/parent/of/models",
            "controlNetModelsPath": "/path/to/models/ControlNet", "upscalerModelsPath": "/path/to/models/ESRGAN",
            "vaeModelsPath": "/path/to/models/VAE", "loraEmbeddingsPath": "/path/to/models/Lora",
            "filenameFormat": "paste the path if it is outside project root", "saveMetadata": True}


def test_frontend_settings_post_is_saved_and_used(client, dl_config, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    resp = client.post("/api/settings/paths", json=frontend_payload(str(out)))
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "success" and body["restart_required"] is True
    assert body["settings"] == {"outputDirectory": str(out)}
    assert body["directories"]["output_directory"] == str(out)
    assert json.loads(dl_config.settings_file.read_text()) == {"outputDirectory": str(out)}
    # the same get_directories() result on every reader
    assert client.get("/health").get_json()["directories"]["output_directory"] == str(out)
    got = client.get("/api/settings/paths").get_json()
    assert got["settings"] == {"outputDirectory": str(out)}


def test_models_directory_is_saved(client, tmp_path):
    models = tmp_path / "comfy_base"
    models.mkdir()
    body = client.post("/api/settings/paths", json={"modelsDirectory": str(models)}).get_json()
    assert body["directories"]["models_directory"] == str(models)


@pytest.mark.parametrize("value, fragment", [
    ("outputs", "must be an absolute path"),
    ("/no/such/folder/for/dreamlayer", "does not exist"),
    (["/tmp"], "must be a string"),
])
def test_invalid_paths_are_clear_400s(client, dl_config, value, fragment):
    resp = client.post("/api/settings/paths", json={"outputDirectory": value})
    assert resp.status_code == 400
    body = resp.get_json()
    assert (body["status"], body["code"], body["field"]) == ("error", "invalid_path", "outputDirectory")
    assert fragment in body["message"]
    assert not dl_config.settings_file.exists()


def test_a_file_is_not_a_directory(client, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    body = client.post("/api/settings/paths", json={"modelsDirectory": str(f)}).get_json()
    assert body["field"] == "modelsDirectory" and "is not a directory" in body["message"]


def test_unwritable_directory_is_refused(client, tmp_path, monkeypatch):
    from dreamlayer.config import saved_paths as dreamlayer_settings
    monkeypatch.setattr(dreamlayer_settings.os, "access", lambda path, mode: False)
    resp = client.post("/api/settings/paths", json={"outputDirectory": str(tmp_path)})
    assert resp.status_code == 400 and "not writable" in resp.get_json()["message"]


@pytest.mark.parametrize("kwargs", [{"data": "not json", "content_type": "application/json"},
                                    {"data": "outputDirectory=/tmp"}, {"json": ["/tmp"]}])
def test_a_body_that_is_not_a_json_object_is_400(client, kwargs):
    resp = client.post("/api/settings/paths", **kwargs)
    assert resp.status_code == 400
    assert resp.get_json()["code"] == "invalid_json"


# ---------------------------------------------------------------------------- served images

def test_serves_a_generated_image(client, dl_config):
    data = png_bytes()
    (dl_config.shared.served_images_dir / "img2img_abc_0_00001_.png").write_bytes(data)
    resp = client.get("/api/images/img2img_abc_0_00001_.png")
    assert resp.status_code == 200
    assert resp.mimetype == "image/png" and resp.data == data


def test_nothing_outside_the_served_folder_is_reachable(client, dl_config, tmp_path):
    served = dl_config.shared.served_images_dir
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (served / "link.png").symlink_to(tmp_path / "secret.png")
    (served / "notes.txt").write_text("not an image")
    (served / ".tmp-half.png").write_bytes(b"partial")
    (served / "sub").mkdir()
    (served / "sub" / "inner.png").write_bytes(png_bytes())
    for name in ["../secret.png", "..%2Fsecret.png", "%2e%2e/secret.png", str(tmp_path / "secret.png"),
                 "link.png", "notes.txt", ".tmp-half.png", "sub/inner.png", "sub", "missing.png",
                 "/etc/passwd", "..\\secret.png"]:
        resp = client.get(f"/api/images/{name}")
        assert resp.status_code == 404, name
        assert resp.get_json()["status"] == "error", name


def test_traversal_over_a_real_socket(live, dl_config, tmp_path):
    """Raw request targets (no client-side normalisation) against waitress."""
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (dl_config.shared.served_images_dir / "ok.png").write_bytes(png_bytes())
    conn = http.client.HTTPConnection("127.0.0.1", dl_config.port, timeout=5)
    try:
        for target in ["/api/images/../../secret.png", "/api/images/..%2f..%2fsecret.png",
                       "/api/images/%2e%2e%2fsecret.png", "/api/images//etc/passwd",
                       f"/api/images/{tmp_path}/secret.png"]:
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404, target
            assert json.loads(body)["status"] == "error", target
        conn.request("GET", "/api/images/ok.png")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Type")) == (200, "image/png")
        resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- CORS, real port

def test_cors_only_for_configured_origins(live):
    ok = requests.get(f"{live.url}/api/models", headers={"Origin": FRONTEND}, timeout=5)
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == FRONTEND
    other = requests.get(f"{live.url}/api/models", headers={"Origin": "http://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in other.headers


def test_settings_preflight_from_the_frontend(live):
    resp = requests.options(f"{live.url}/api/settings/paths", timeout=5, headers={
        "Origin": FRONTEND, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()


def test_model_list_and_503_over_a_real_port(live, fake_comfy):
    assert requests.get(f"{live.url}/api/models", timeout=5).json()["status"] == "success"
    fake_comfy.refuse_connections()
    resp = requests.get(f"{live.url}/api/lora-models", timeout=10)
    assert resp.status_code == 503 and resp.headers["Content-Type"] == "application/json"
    assert resp.json()["code"] == "comfyui_unreachable"


# ---------------------------------------------------------------------------- configuration, main()

def test_config_defaults_and_env(tmp_path):
    cfg = DreamLayerConfig.from_env({})
    assert (cfg.host, cfg.port, cfg.demo) == ("127.0.0.1", 5002, False)
    assert cfg.comfy_api_url == "http://127.0.0.1:8188"
    assert cfg.settings_file == ROOT / "data" / "settings.json"
    assert cfg.display_names_file == ROOT / "data" / "model_display_names.json"
    assert cfg.log_dir == ROOT / "logs" and cfg.comfyui_log == ROOT / "logs" / "comfyui.log"
    assert cfg.comfyui_cors_origin == "http://localhost:8080"
    cfg = DreamLayerConfig.from_env({
        "DREAMLAYER_HOST": "0.0.0.0", "DREAMLAYER_PORT": "6002", "COMFY_API_URL": "http://10.0.0.5:8188/",
        "DREAMLAYER_SETTINGS_FILE": str(tmp_path / "s.json"), "DREAMLAYER_MODEL_NAMES_FILE": str(tmp_path / "n.json"),
        "DREAMLAYER_LOG_DIR": str(tmp_path / "logs"), "DREAMLAYER_DEMO": "1",
        "COMFYUI_EXTRA_ARGS": "--cpu --lowvram", "CORS_ORIGINS": "http://a:1,http://b:2"})
    assert (cfg.host, cfg.port, cfg.demo, cfg.comfy_api_url) == ("0.0.0.0", 6002, True, "http://10.0.0.5:8188")
    assert cfg.settings_file == tmp_path / "s.json" and cfg.display_names_file == tmp_path / "n.json"
    assert cfg.comfyui_extra_args == ("--cpu", "--lowvram") and cfg.comfyui_cors_origin == "http://a:1"
    for bad in ({"DREAMLAYER_PORT": "abc"}, {"DREAMLAYER_PORT": "70000"}, {"DREAMLAYER_THREADS": "0"}):
        with pytest.raises(ConfigError):
            DreamLayerConfig.from_env(bad)


def _run_main(env_extra, timeout=20):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, str(ROOT / "dream_layer.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_main_rejects_bad_configuration():
    result = _run_main({"DREAMLAYER_PORT": "not-a-port"})
    assert result.returncode == 2 and "invalid configuration value" in result.stderr


def test_main_explains_a_busy_port(tmp_path, reserve_port):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = _run_main({"DREAMLAYER_PORT": str(port), "COMFY_API_URL": f"http://127.0.0.1:{reserve_port()}",
                            "SERVED_IMAGES_DIR": str(tmp_path / "served")})
    assert result.returncode == 1
    assert "or set DREAMLAYER_PORT" in result.stderr and "cannot listen" in result.stderr
