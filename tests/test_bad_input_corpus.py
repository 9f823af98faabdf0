"""The bad-input corpus (tests/corpus/bad_requests.py) against the real app on a real port.

One fake ComfyUI and one waitress-served app for the whole module; every case is one POST
/api/img2img. Each must get exactly its status and error code as JSON (never a 5xx, never an
echo of megabytes), or, for inputs that are valid after all, a 200 with correct images. After
every case nothing may be left in ComfyUI's input folder, in the served folder besides the
results, or in the temporary folder (werkzeug spools large parts there).
"""
from __future__ import annotations

import io
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dreamlayer.config.img2img import Config
from corpus.bad_requests import CASES, ERROR_CASES, VALID_CASES
from dreamlayer.comfyui.fake import FakeComfyUI
from dreamlayer.img2img.app import create_app
from service_fixtures import LiveServer, bound_socket, port_of


@dataclass
class Env:
    url: str
    fake: FakeComfyUI
    config: Config
    tmpdir: Path
    results: set = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    sent: set = field(default_factory=set)  # ids of the cases sent so far

    def files_left(self) -> dict:
        served = self.config.served_images_dir
        return {
            "comfy input": sorted(str(p.relative_to(self.fake.input_dir)) for p in self.fake.input_dir.rglob("*")
                                  if p.is_file()),
            "served (not a result)": sorted(p.name for p in served.iterdir() if p.name not in self.results),
            "temp": sorted(p.name for p in self.tmpdir.iterdir()),
        }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tmpdir = root / "tmp"
    tmpdir.mkdir()
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(tmpdir)  # where spooled uploads would go
    fake = FakeComfyUI(root / "comfy").start()
    sock = bound_socket()
    port = port_of(sock)
    config = Config(comfy_api_url=fake.url, comfyui_input_dir=fake.input_dir, served_images_dir=root / "served",
                    public_base_url=f"http://127.0.0.1:{port}", port=port, comfy_timeout_s=20)
    server = LiveServer(create_app(config), sock).start()
    try:
        yield Env(server.url, fake, config, tmpdir)
    finally:
        server.stop()
        sock.close()
        fake.stop()
        tempfile.tempdir = saved_tempdir


def send(env: Env, case) -> requests.Response:
    req = case.build()
    headers = {"Content-Type": req.content_type} if req.content_type else {}
    resp = requests.post(f"{env.url}/api/img2img", data=req.body, headers=headers, timeout=60)
    env.statuses[resp.status_code] += 1
    env.sent.add(case.id)
    if resp.status_code == 200:  # right for the valid cases, wrong for the others: served either way
        env.results.update(i["filename"] for i in resp.json()["comfy_response"]["generated_images"])
    return resp


def fetch(url: str) -> np.ndarray:
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/png", url
    return np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.id)
def test_bad_request_gets_its_exact_error(env, case):
    prompts_before = len(env.fake.prompts)  # the valid cases (in any order) queue prompts
    resp = send(env, case)
    assert resp.status_code < 500, resp.text[:500]
    assert resp.headers["Content-Type"] == "application/json", resp.text[:200]
    data = resp.json()
    assert (resp.status_code, data.get("code")) == (case.status, case.code), data
    assert data["status"] == "error" and isinstance(data["message"], str) and len(data["message"]) > 10
    if case.field is not None:
        assert data.get("field") == case.field, data
    for fragment in case.says:
        assert fragment in data["message"], data["message"]
    assert len(resp.content) < 8192, "an error must not echo the request back"
    assert env.fake.prompts[prompts_before:] == [], "nothing may reach ComfyUI for a bad request"
    assert env.files_left() == {"comfy input": [], "served (not a result)": [], "temp": []}


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: c.id)
def test_valid_after_all_gives_a_correct_result(env, case):
    before = len(env.fake.prompts)
    resp = send(env, case)
    assert resp.status_code == 200, resp.text[:500]
    data = resp.json()
    assert data["status"] == "success" and len(env.fake.prompts) > before
    images = data["comfy_response"]["generated_images"]
    warnings = " ".join(data["warnings"])
    for fragment in case.says:
        assert fragment in warnings, data["warnings"]
    outputs = [fetch(i["url"]) for i in images]
    if case.check is not None:
        case.check(outputs)
    assert env.files_left() == {"comfy input": [], "served (not a result)": [], "temp": []}


def test_the_corpus_covers_every_category_of_the_issue():
    assert len(ERROR_CASES) >= 40
    categories = Counter(c.category for c in CASES)
    for needed in ("content type", "missing part", "params", "parameter", "not an image", "truncated", "corrupt",
                   "mask type", "size", "bomb", "animated", "valid", "aspect ratio", "base64", "data url",
                   "file name"):
        assert categories[needed] > 0, needed
    ids = {c.id for c in CASES}
    for needed in ("param-prompt-1MB-json", "param-steps-NaN-json", "param-cfg-1e309-json",
                   "param-steps-negative-multipart", "image-truncated-png", "image-truncated-jpeg",
                   "image-png-bad-crc", "mask-jpeg-renamed-png", "mask-10MiB-plus-1", "image-png-50000x50000",
                   "valid-apng-first-frame", "image-animated-gif", "valid-16-bit-png", "valid-palette-png",
                   "valid-la-png", "valid-cmyk-jpeg", "valid-exif-rotated-jpeg", "valid-mask-other-aspect-ratio",
                   "valid-mask-palette", "b64-garbage", "dataurl-text-plain", "filename-traversal", "filename-nul",
                   "filename-unicode"):
        assert needed in ids, needed


def test_after_the_corpus_nothing_is_left_and_the_service_still_works(env):
    """The same service answers a normal request after the whole corpus. In whatever order the
    tests run (or this one alone), the cases not sent yet are sent here first."""
    for case in CASES:
        if case.id not in env.sent:
            send(env, case)
    assert len(env.sent) == len(CASES)
    assert all(status < 500 for status in env.statuses), env.statuses
    from corpus.bad_requests import form, gradient_png, box_mask, EXACT_MASK
    req = form(EXACT_MASK, gradient_png, box_mask)()
    resp = requests.post(f"{env.url}/api/img2img", data=req.body, headers={"Content-Type": req.content_type},
                         timeout=30)
    assert resp.status_code == 200, resp.text
    env.results.update(i["filename"] for i in resp.json()["comfy_response"]["generated_images"])
    assert sorted(p.name for p in env.config.served_images_dir.iterdir()) == sorted(env.results)
    assert env.files_left() == {"comfy input": [], "served (not a result)": [], "temp": []}
    root = env.config.served_images_dir.parent
    strays = [p for p in root.rglob("*") if p.is_file() and ("evil" in p.name or "passwd" in p.name
                                                           or "\u2603" in p.name or p.name.startswith(".tmp-"))]
    assert strays == []
