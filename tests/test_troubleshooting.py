"""docs/troubleshooting.md lists every error code the service can answer, under its status, and has
the sections the issue asks for."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from dreamlayer.backend import api_keys, controlnet_uploads, images, model_uploads
from dreamlayer.comfyui import client as comfy_client
from dreamlayer import errors, web_security

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
#: Every module of the package that can raise an error a client sees.
SOURCES = ["dreamlayer/errors.py"] + sorted(
    str(p.relative_to(ROOT)) for part in ("img2img", "jobs", "comfyui", "backend") for p in (ROOT / "dreamlayer" / part).rglob("*.py")
    if "fake" not in p.relative_to(ROOT / "dreamlayer").parts)


def codes_in_the_code() -> set:
    found = {"internal_error", "http_error"} | set(errors.HTTP_CODES.values())
    for name in SOURCES:
        text = (ROOT / name).read_text(encoding="utf-8")
        found |= set(re.findall(r"\bcode\s*=\s*\"([a-z][a-z0-9_]*)\"", text))
        found |= set(re.findall(r"\"code\"\s*:\s*\"([a-z][a-z0-9_]*)\"", text))
    # codes handed to helpers positionally (img2img_request._loads)
    found |= set(re.findall(r"_loads\([^)]*\"([a-z][a-z0-9_]*)\"\)", (ROOT / "dreamlayer" / "img2img" / "request.py").read_text()))
    return found


def codes_in_openapi() -> set:
    doc = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8"))
    out = set()
    for response in doc["components"]["responses"].values():
        for part in response.get("content", {}).get("application/json", {}).get("schema", {}).get("allOf", []):
            out |= set(part.get("properties", {}).get("code", {}).get("enum", []))
    return out


def rows() -> dict:
    """code -> the status of the table it is listed in (a table row starting with it)."""
    out, status = {}, None
    for line in DOC.splitlines():
        heading = re.match(r"^###\s+(\d{3})", line)
        if heading:
            status = int(heading.group(1))
        row = re.match(r"^\|\s*(?:(\d{3})\s*\|\s*)?`([a-z][a-z0-9_]*)`\s*\|", line)
        if row and status is not None:
            out[row.group(2)] = int(row.group(1) or status)
    return out


def test_every_error_code_has_a_row_with_cause_and_fix():
    listed = rows()
    missing = (codes_in_the_code() | codes_in_openapi()) - set(listed)
    assert not missing, f"docs/troubleshooting.md lacks {sorted(missing)}"
    assert len(listed) >= 40


def test_codes_are_listed_under_their_status():
    listed = rows()
    for cls in [errors.ApiError, errors.InvalidParameter, errors.PayloadTooLarge, errors.UnsupportedMediaType,
                comfy_client.ComfyError, comfy_client.ComfyUnreachable, comfy_client.ComfyRejected,
                comfy_client.ComfyExecutionFailed, comfy_client.ComfyInterrupted, comfy_client.ComfyTimeout,
                comfy_client.ComfyBadResponse, images.InvalidFilename, images.ImageNotFound,
                api_keys.InvalidApiKey, model_uploads.MissingFile, model_uploads.UnsupportedModelFile,
                model_uploads.ModelTooLarge, model_uploads.ModelExists, model_uploads.ModelsFolderUnknown,
                model_uploads.DiskFull, model_uploads.WriteFailed, controlnet_uploads.InputFolderUnknown,
                web_security.OriginNotAllowed]:
        assert listed.get(cls.code) == cls.status, (cls.__name__, cls.code, cls.status, listed.get(cls.code))
    for status, code in errors.HTTP_CODES.items():
        assert listed.get(code) == status, (code, status)
    for code, status in {"image_not_found": 404, "job_not_found": 404, "job_expired": 404, "mask_not_png": 415,
                         "mask_too_large": 413, "image_too_large": 413, "missing_image": 400, "mask_empty": 400,
                         "unknown_model": 400, "http_error": 416}.items():
        assert listed.get(code) == status, (code, status)


def test_the_three_situations_have_their_sections():
    for heading in ("## ComfyUI is not running", "## Model not found", "## Mask rejected"):
        assert heading in DOC
    section = DOC.split("## Mask rejected")[1].split("\n## ")[0]
    for code in ("mask_not_png", "mask_too_large", "invalid_mask", "mask_empty"):
        assert f"`{code}`" in section
    assert "COMFY_API_URL" in DOC.split("## ComfyUI is not running")[1].split("\n## ")[0]


def api_table() -> dict:
    """code -> status, from docs/api.md's "Errors" table of POST /api/img2img."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    table = text[text.index("### Errors"):]
    table = table[:table.index("\n\n", table.index("| status |"))]
    out = {}
    for line in table.splitlines():
        row = re.match(r"^\|\s*(\d{3})\s*\|(.*?)\|", line)
        if row:
            out.update((code, int(row.group(1))) for code in re.findall(r"`([a-z][a-z0-9_]*)`", row.group(2)))
    return out


def test_the_api_error_table_lists_every_code_of_the_img2img_service_under_its_status():
    """docs/api.md's table is the one an API client reads: every code the img2img service (not
    dream_layer.py) can answer, under the same status as troubleshooting.md."""
    img2img = {"internal_error", "http_error"} | set(errors.HTTP_CODES.values())
    for part in ("img2img", "jobs", "comfyui"):
        for path in (ROOT / "dreamlayer" / part).rglob("*.py"):
            if "fake" not in path.parts:
                text = path.read_text(encoding="utf-8")
                img2img |= set(re.findall(r"\bcode\s*=\s*\"([a-z][a-z0-9_]*)\"", text))
                img2img |= set(re.findall(r"\"code\"\s*:\s*\"([a-z][a-z0-9_]*)\"", text))
    img2img |= codes_in_openapi()
    listed, statuses = api_table(), rows()
    assert not img2img - set(listed), f"docs/api.md's error table lacks {sorted(img2img - set(listed))}"
    wrong = {code: (status, statuses.get(code)) for code, status in listed.items() if statuses.get(code) != status}
    assert not wrong, f"docs/api.md and troubleshooting.md disagree (api, troubleshooting): {wrong}"
