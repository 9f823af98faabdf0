"""docs/openapi.yaml: served at GET /openapi.json, a valid OpenAPI 3 document that matches the
app's routes and error codes (the app driven from it: test_openapi_fuzz.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

from dreamlayer.comfyui import client as comfy_client
from dreamlayer import errors

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "openapi.yaml"
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}
#: Modules whose errors reach clients.
SOURCES = ["dreamlayer/errors.py"] + sorted(
    str(p.relative_to(ROOT)) for part in ("img2img", "jobs", "comfyui") for p in (ROOT / "dreamlayer" / part).rglob("*.py")
    if "fake" not in p.relative_to(ROOT / "dreamlayer").parts)


@pytest.fixture(scope="module")
def doc() -> dict:
    return yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))


def documented_codes(doc) -> dict:
    """status -> the error codes the document lists for it."""
    out = {}
    for response in doc["components"]["responses"].values():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        for part in schema.get("allOf", []):
            enum = part.get("properties", {}).get("code", {}).get("enum")
            if enum:
                out.setdefault(response_status(doc, response), set()).update(enum)
    return out


def response_status(doc, response) -> int:
    name = next(k for k, v in doc["components"]["responses"].items() if v is response)
    for ops in doc["paths"].values():
        for op in ops.values():
            for status, ref in op.get("responses", {}).items():
                if ref.get("$ref") == f"#/components/responses/{name}":
                    return int(status)
    raise AssertionError(f"response {name} is not used")


# --- the document ---------------------------------------------------------------------------------

def test_the_document_is_served_at_openapi_json(client, doc):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.get_json() == doc
    # in the document's order (openapi, info, ... as written), not sorted: readable with curl
    assert list(resp.get_json()) == list(doc) and list(resp.get_json()["info"]) == list(doc["info"])


def test_the_document_is_valid_openapi_3(doc):
    validate(doc)
    assert doc["openapi"].startswith("3.")


def test_every_route_of_the_app_is_documented_and_nothing_else(app, doc):
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops if m in HTTP_METHODS}
    assert routes == documented


def test_every_parameter_the_service_reads_is_documented(doc):
    from dreamlayer.img2img import params

    props = doc["components"]["schemas"]["Img2ImgParameters"]["properties"]
    from dreamlayer.img2img import advanced_params

    missing = (params._KNOWN_KEYS | advanced_params.KEYS | {"async"}) - set(props)
    assert not missing, f"not in the document: {sorted(missing)}"
    json_props = doc["components"]["schemas"]["Img2ImgJson"]["allOf"][1]["properties"]
    assert set(params.IMAGE_KEYS) <= set(json_props)
    assert {"image", "mask", "params"} == set(doc["components"]["schemas"]["Img2ImgMultipart"]["properties"])


def test_ranges_in_the_document_are_the_services(doc):
    """Every documented minimum/maximum is enforced: one past it is a 400 naming the field."""
    from dreamlayer.img2img import params as P

    props = doc["components"]["schemas"]["Img2ImgParameters"]["properties"]
    checked = 0
    for name, schema in props.items():
        for bound, step in (("minimum", -1), ("maximum", 1)):
            if bound not in schema or name == "seed" and bound == "maximum":
                continue
            beyond = schema[bound] + (step if schema.get("type") == "integer" else step * 0.001)
            with pytest.raises(errors.InvalidParameter) as info:
                P.parse_params({"prompt": "x", name: beyond})
            assert info.value.details["field"] == name
            P.parse_params({"prompt": "x", name: schema[bound]})  # the bound itself is fine
            checked += 1
    assert checked >= 20


def test_every_error_code_of_the_code_is_documented_under_its_status(doc):
    codes = documented_codes(doc)
    all_documented = set().union(*codes.values())
    found = set()
    for name in SOURCES:
        text = (ROOT / name).read_text(encoding="utf-8")
        found |= set(re.findall(r"\bcode\s*=\s*\"([a-z][a-z0-9_]*)\"", text))
        found |= set(re.findall(r"\"code\"\s*:\s*\"([a-z][a-z0-9_]*)\"", text))
    found |= set(errors.HTTP_CODES.values()) | {"internal_error", "http_error"}
    # 405 belongs to no operation (it answers the methods a path does not have): the overview says it
    assert "`method_not_allowed`" in doc["info"]["description"]
    found.discard("method_not_allowed")
    assert found - all_documented == set(), f"codes the document does not list: {sorted(found - all_documented)}"
    # the exception classes answer with the status the document lists their code under
    classes = [errors.ApiError, errors.BadRequest, errors.InvalidParameter, errors.PayloadTooLarge,
               errors.UnsupportedMediaType] + [getattr(comfy_client, n) for n in dir(comfy_client)
                                               if n.startswith("Comfy") and n.endswith(("Error", "Unreachable",
                                               "Rejected", "Failed", "Interrupted", "Timeout", "Response"))]
    for cls in classes:
        if isinstance(cls, type) and hasattr(cls, "status") and hasattr(cls, "code"):
            assert cls.code in codes.get(cls.status, set()), (cls.__name__, cls.status, cls.code)
    for status, code in errors.HTTP_CODES.items():
        assert code in codes.get(status, set()) or status in (400, 405), (status, code)
