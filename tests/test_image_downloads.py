""":5004's /images/<name>: the URLs the img2img service answers, where DreamLayer's "Download PNG" link
points. Chromium opens a cross-origin <a download target=_blank> in a new tab instead of saving it
unless the answer says Content-Disposition: attachment; an <img> shows such an answer all the same."""
from __future__ import annotations

import io

from PIL import Image
from werkzeug.http import parse_options_header

from dreamlayer.config.img2img import Config
from dreamlayer.img2img.app import create_app

FRONTEND = "http://localhost:8080"


def png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_images_download_and_still_show_in_an_img(tmp_path, reserve_port):
    app = create_app(Config(comfy_api_url=f"http://127.0.0.1:{reserve_port()}", served_images_dir=tmp_path / "s",
                            cors_origins=(FRONTEND,)))
    data = png_bytes()
    (tmp_path / "s" / "img2img_r_0_00001_.png").write_bytes(data)
    client = app.test_client()
    resp = client.get("/images/img2img_r_0_00001_.png", headers={"Origin": FRONTEND})
    assert resp.status_code == 200 and resp.mimetype == "image/png" and resp.data == data
    assert parse_options_header(resp.headers["Content-Disposition"]) == ("attachment",
                                                                         {"filename": "img2img_r_0_00001_.png"})
    assert resp.headers["Access-Control-Allow-Origin"] == FRONTEND
    inline = client.get("/api/images/img2img_r_0_00001_.png")
    assert parse_options_header(inline.headers["Content-Disposition"])[0] == "inline" and inline.data == data


def test_a_range_it_cannot_serve_is_ignored_and_one_byte_range_is_served(tmp_path, reserve_port):
    """RFC 9110 14.2: a Range in another unit, malformed or of several ranges (Werkzeug serves one)
    is ignored: the whole image, 200 (Werkzeug alone answered 416). One range is a 206; a range
    past the end stays a 416."""
    app = create_app(Config(comfy_api_url=f"http://127.0.0.1:{reserve_port()}", served_images_dir=tmp_path / "s"))
    data = png_bytes()
    (tmp_path / "s" / "img2img_r_0_00001_.png").write_bytes(data)
    client = app.test_client()
    for route in ("/images/", "/api/images/"):
        url = route + "img2img_r_0_00001_.png"
        for header in ("bytes=abc", "bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes="):
            resp = client.get(url, headers={"Range": header})
            assert resp.status_code == 200 and resp.data == data, (header, resp.status_code)
        part = client.get(url, headers={"Range": "bytes=2-5"})
        assert part.status_code == 206 and part.data == data[2:6]
        past = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
        assert past.status_code == 416 and past.get_json()["code"] == "http_error"
