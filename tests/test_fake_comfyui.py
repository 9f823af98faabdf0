"""Tests of the fake ComfyUI itself, over real sockets, against captures of a real ComfyUI 0.3.40.

The expectations come from tests/fixtures/comfyui_captures.json (reduced from the captures) and
tests/fixtures/comfyui_inputs/ (the probe images the captures were made with).
"""
from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import websocket
from PIL import Image

from dreamlayer.comfyui.fake import FakeComfyUI
from waiting import TIMEOUT, wait_until

FIXTURES = Path(__file__).parent / "fixtures"
INPUTS = FIXTURES / "comfyui_inputs"
CAPS = json.loads((FIXTURES / "comfyui_captures.json").read_text())
VOLATILE_KEYS = {"prompt_id", "timestamp", "traceback", "sid"}


# --- helpers ----------------------------------------------------------------------------------

def normalize(obj):
    """JSON with volatile values (ids, timestamps, tracebacks) blanked, for structural equality."""
    if isinstance(obj, dict):
        return {k: ("<volatile>" if k in VOLATILE_KEYS else normalize(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    return obj


def put_inputs(fake, *names):
    for name in names:
        shutil.copy(INPUTS / name, fake.input_dir / name)


def success_workflow(**changes) -> dict:
    """The captured inpainting prompt (VAEEncodeForInpaint, 64x64, 4 steps), optionally edited."""
    prompt = copy.deepcopy(CAPS["prompt_success"]["request"]["json"]["prompt"])
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


class Ws:
    """A websocket-client connection that collects ComfyUI messages."""

    def __init__(self, fake, client_id=None, timeout=TIMEOUT):
        url = fake.url.replace("http://", "ws://") + "/ws" + (f"?clientId={client_id}" if client_id else "")
        self.conn = websocket.create_connection(url, timeout=timeout)
        self.messages: list = []
        self.hello = self.recv()

    def recv(self):
        raw = self.conn.recv()
        msg = raw if isinstance(raw, bytes) else json.loads(raw)
        self.messages.append(msg)
        return msg

    def until(self, pred, limit=2000):
        for _ in range(limit):
            msg = self.recv()
            if not isinstance(msg, bytes) and pred(msg):
                return msg
        raise AssertionError("message not seen")

    def until_done(self, prompt_id):
        return self.until(lambda m: m["type"] == "executing" and m["data"].get("node") is None
                          and m["data"].get("prompt_id") == prompt_id)

    def close(self):
        self.conn.close()


def post_prompt(fake, prompt, client_id=None, **extra):
    body = {"prompt": prompt, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    return requests.post(fake.url + "/prompt", json=body, timeout=5)


def run(fake, prompt, client_id="tester"):
    """Queue a prompt with a listening socket; return (prompt_id, all messages incl. the hello)."""
    ws = Ws(fake, client_id)
    try:
        r = post_prompt(fake, prompt, client_id)
        assert r.status_code == 200, r.text
        prompt_id = r.json()["prompt_id"]
        ws.until_done(prompt_id)
        return prompt_id, ws.messages
    finally:
        ws.close()


def types(messages):
    """Message types; binary frames (live bytes, or {"binary": true} in captures) as "<binary>"."""
    return ["<binary>" if isinstance(m, bytes) or m.get("binary") else m["type"] for m in messages]


def history(fake, prompt_id):
    """The /history entry of the prompt, once written (0.3.40 writes it after execution_success)."""
    return wait_until(lambda: requests.get(f"{fake.url}/history/{prompt_id}", timeout=5).json().get(prompt_id),
                      what=f"the /history entry of {prompt_id}")


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


# --- fixture (object_info) ---------------------------------------------------------------------

REQUESTED_CLASSES = (
    "CheckpointLoaderSimple CLIPTextEncode CLIPSetLastLayer LoadImage LoadImageMask VAEEncode VAEEncodeForInpaint "
    "VAEDecode SetLatentNoiseMask RepeatLatentBatch EmptyLatentImage LatentUpscale KSampler KSamplerAdvanced "
    "SaveImage PreviewImage ImageScale ImageCrop ImageCompositeMasked ImageInvert ImagePadForOutpaint MaskToImage "
    "ImageToMask InvertMask GrowMask SolidMask LoraLoader ControlNetLoader ControlNetApplyAdvanced "
    "SetUnionControlNetType Canny UpscaleModelLoader "
    # issue 14 (hires fix, refiner, tiled VAE, VAE override) and issue 15 (inpainting)
    "ImageUpscaleWithModel LatentUpscaleBy ImageScaleBy VAEEncodeTiled VAEDecodeTiled VAELoader ImageBlend "
    "InpaintModelConditioning DifferentialDiffusion FeatherMask ThresholdMask").split()


def test_object_info_fixture_holds_the_requested_classes(fake_comfy):
    info = requests.get(fake_comfy.url + "/object_info", timeout=5).json()
    assert sorted(info) == sorted(REQUESTED_CLASSES)
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["tiny-sd15-random.safetensors"]
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == ["tiny-lora-random.safetensors"]
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == [
        "tiny-controlnet-random.safetensors"]
    assert len(info["KSampler"]["input"]["required"]["sampler_name"][0]) == 38
    assert info["SaveImage"]["output_node"] is True and info["PreviewImage"]["output_node"] is True
    one = requests.get(fake_comfy.url + "/object_info/KSampler", timeout=5)
    assert one.headers["Content-Type"] == "application/json; charset=utf-8"
    assert one.json() == {"KSampler": info["KSampler"]}
    assert requests.get(fake_comfy.url + "/object_info/NoSuchNode", timeout=5).json() == {}


def test_loadimage_enum_lists_the_input_folder(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "corrupt_probe.png")
    (fake_comfy.input_dir / "notes.txt").write_text("x")
    info = requests.get(fake_comfy.url + "/object_info", timeout=5).json()
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["corrupt_probe.png", "probe_src_64.png"]
    assert info["LoadImageMask"]["input"]["required"]["image"][0] == [
        "corrupt_probe.png", "notes.txt", "probe_src_64.png"]


def test_add_model_extends_enum_lists_and_validation_follows(fake_comfy):
    prompt = success_workflow(**{"1": {"ckpt_name": "other.safetensors"}})
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    assert post_prompt(fake_comfy, prompt).status_code == 400
    fake_comfy.add_model("checkpoints", "other.safetensors")
    assert requests.get(fake_comfy.url + "/models/checkpoints", timeout=5).json() == [
        "other.safetensors", "tiny-sd15-random.safetensors"]
    assert post_prompt(fake_comfy, prompt).status_code == 200
    with pytest.raises(ValueError):
        fake_comfy.add_model("nope", "x")


# --- validation: captured error replays --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CAPS["prompt_errors"]))
def test_prompt_error_replay_matches_capture(fake_comfy, name):
    cap = CAPS["prompt_errors"][name]
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    req = cap["request"]
    if "raw_body" in req:
        r = requests.post(fake_comfy.url + "/prompt", data=req["raw_body"],
                          headers={"Content-Type": "application/json"}, timeout=5)
    else:
        r = requests.post(fake_comfy.url + "/prompt", json=req["json"], timeout=5)
    assert r.status_code == cap["status"]
    assert r.headers.get("Content-Type") == cap["content_type"]
    if cap["content_type"].startswith("text/plain"):
        assert r.text == cap["body"]
    else:
        assert normalize(r.json()) == normalize(cap["body"])
    assert fake_comfy.prompts == []
    assert len(fake_comfy.rejected) == 1


def test_rejected_prompt_sends_only_the_connect_status(fake_comfy):
    ws = Ws(fake_comfy, "val")
    cap = CAPS["prompt_errors"]["bad_enum_sampler_name"]["request"]["json"]
    assert requests.post(fake_comfy.url + "/prompt", json={**cap, "client_id": "val"}, timeout=5).status_code == 400
    fake_comfy.wait_idle()  # anything it would send has been sent
    ws.conn.settimeout(0.2)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()
    assert types(ws.messages) == types(CAPS["ws"]["validation_errors"])


def test_validation_converts_values_and_reports_partial_failures(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    prompt = success_workflow(**{"7": {"seed": "5", "cfg": "7"}})
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["404", 0]}}
    r = post_prompt(fake_comfy, prompt)
    assert r.status_code == 200  # one good output is enough
    body = r.json()
    assert body["node_errors"]["10"]["errors"][0]["type"] == "exception_during_validation"
    queued = fake_comfy.prompts[0][1]
    assert queued["7"]["inputs"]["seed"] == 5 and queued["7"]["inputs"]["cfg"] == 7.0
    fake_comfy.wait_idle()
    h = history(fake_comfy, body["prompt_id"])
    assert h["prompt"][4] == ["9"]


def test_unreachable_nodes_are_not_validated(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    prompt = success_workflow()
    prompt["20"] = {"class_type": "KSampler", "inputs": {"seed": "not a number"}}  # feeds no output
    assert post_prompt(fake_comfy, prompt).status_code == 200


@pytest.mark.parametrize("name", sorted(CAPS["loadimage_name_forms"]))
def test_loadimage_name_forms_match_capture(fake_comfy, name):
    expected = CAPS["loadimage_name_forms"][name]
    for folder in (fake_comfy.input_dir, fake_comfy.output_dir, fake_comfy.temp_dir):
        (folder / "probe_sub").mkdir(exist_ok=True)
        shutil.copy(INPUTS / "probe_upl.png", folder / "probe_upl.png")
        shutil.copy(INPUTS / "probe_upl.png", folder / "probe_sub" / "probe_upl.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    r = post_prompt(fake_comfy, prompt)
    assert r.status_code == expected["status"]
    if r.status_code == 400:
        assert r.json()["node_errors"] == expected["node_errors"]
    else:
        h = history(fake_comfy, r.json()["prompt_id"])
        assert h["status"]["status_str"] == expected["history_status"]


# --- execution: websocket sequences --------------------------------------------------------------

def test_success_sequence_matches_capture(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    prompt_id, msgs = run(fake_comfy, success_workflow(), "c1")
    cap = CAPS["ws"]["success"]
    assert types(msgs) == types(cap)
    for got, want in zip(msgs, cap):
        assert sorted(got["data"]) == sorted(want["data"])
        if got["type"] in ("executing", "progress", "executed", "execution_cached", "status"):
            assert normalize(got["data"]) == normalize(want["data"])
    assert msgs[0]["data"]["sid"] == "c1"
    assert (fake_comfy.output_dir / "probe_00001_.png").is_file()

    h = history(fake_comfy, prompt_id)
    want = CAPS["history"]["success"]["body"]["1b0e1920-3087-4d33-99e8-050fe6152d5e"]
    assert list(h) == list(want)
    assert h["outputs"] == want["outputs"] and h["meta"] == want["meta"]
    assert normalize(h["status"]) == normalize(want["status"])
    assert h["prompt"][1:] == [prompt_id, want["prompt"][2], {"client_id": "c1"}, ["9"]]


def test_history_can_lag_execution_success(fake_comfy):
    """0.3.40 writes /history after sending execution_success; clients must tolerate the gap."""
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.history_delay = 3600  # held back until released below
    ws = Ws(fake_comfy, "lag")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "lag").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "execution_success")
    assert requests.get(f"{fake_comfy.url}/history/{prompt_id}", timeout=5).json() == {}
    assert fake_comfy.running_prompt_id() == prompt_id  # still in queue_running, as in ComfyUI
    fake_comfy.history_delay = 0  # the gap in progress ends
    ws.until_done(prompt_id)  # the executing-null message comes after the write
    assert requests.get(f"{fake_comfy.url}/history/{prompt_id}", timeout=5).json() != {}
    assert fake_comfy.running_prompt_id() is None
    ws.close()


def test_cached_rerun_resends_old_filename_without_writing(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "a")
    before = sorted(p.name for p in fake_comfy.output_dir.iterdir())
    prompt_id, msgs = run(fake_comfy, success_workflow(), "b")
    assert types(msgs) == types(CAPS["ws"]["cached"])
    assert normalize([m["data"] for m in msgs[3:]]) == normalize([m["data"] for m in CAPS["ws"]["cached"][3:]])
    assert sorted(p.name for p in fake_comfy.output_dir.iterdir()) == before == ["probe_00001_.png"]
    h = history(fake_comfy, prompt_id)
    want = CAPS["history"]["cached"]["body"]["dea6190c-91e0-45f7-ae72-4aa9c71eb386"]
    assert h["outputs"] == want["outputs"] and normalize(h["status"]) == normalize(want["status"])


def test_changed_seed_reruns_sampler_and_downstream_only(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "a")
    _, msgs = run(fake_comfy, success_workflow(**{"7": {"seed": 2}}), "a")
    cached = next(m for m in msgs if m["type"] == "execution_cached")["data"]["nodes"]
    assert cached == ["1", "2", "3", "4", "5", "6"]
    assert [m["data"]["node"] for m in msgs if m["type"] == "executing"] == ["7", "8", "9", None]
    assert sorted(p.name for p in fake_comfy.output_dir.iterdir()) == ["probe_00001_.png", "probe_00002_.png"]


def test_loadimage_reruns_when_its_file_changes(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "a")
    shutil.copy(INPUTS / "probe_upl_B.png", fake_comfy.input_dir / "probe_src_64.png")
    _, msgs = run(fake_comfy, success_workflow(), "a")
    cached = next(m for m in msgs if m["type"] == "execution_cached")["data"]["nodes"]
    assert cached == ["1", "2", "3", "5"]


def test_exec_error_sequence_matches_capture(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png", "corrupt_probe.png")
    run(fake_comfy, success_workflow(), "a")  # as in the probe: 1,2,3,5 are then cached
    prompt = success_workflow(**{"4": {"image": "corrupt_probe.png"}, "9": {"filename_prefix": "probe_err"}})
    prompt_id, msgs = run(fake_comfy, prompt, "e")
    cap = CAPS["ws"]["exec_error"]
    assert types(msgs) == types(cap)
    got = next(m for m in msgs if m["type"] == "execution_error")["data"]
    want = next(m for m in cap if m["type"] == "execution_error")["data"]
    assert sorted(got) == sorted(want)
    for key in ("node_id", "node_type", "executed", "exception_type", "current_inputs"):
        assert got[key] == want[key], key
    assert sorted(got["current_outputs"]) == sorted(want["current_outputs"])
    assert got["exception_message"] == f"cannot identify image file '{fake_comfy.input_dir / 'corrupt_probe.png'}'"
    assert next(m for m in msgs if m["type"] == "execution_cached")["data"]["nodes"] == ["1", "2", "3", "5"]
    h = history(fake_comfy, prompt_id)
    want_h = CAPS["history"]["exec_error"]["body"]["8494cdc4-cd12-4f12-917a-c54e4ccd155d"]
    assert h["outputs"] == {} and h["meta"] == {}
    assert h["status"]["status_str"] == "error" and h["status"]["completed"] is False
    assert [m[0] for m in h["status"]["messages"]] == [m[0] for m in want_h["status"]["messages"]]


def test_interrupt_sequence_matches_capture(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.step_delay = 0.02  # 200 steps: seconds of room for the interrupt to land mid-sampling
    ws = Ws(fake_comfy, "i")
    prompt_id = post_prompt(fake_comfy, success_workflow(**{"7": {"steps": 200}}), "i").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "progress" and m["data"]["value"] == 3)
    assert requests.post(fake_comfy.url + "/interrupt", timeout=5).status_code == 200
    ws.until_done(prompt_id)
    ws.close()

    def squash(ts):  # the number of progress messages depends on timing
        return [t for i, t in enumerate(ts) if not (t == "progress" and i and ts[i - 1] == "progress")]
    got_types = squash(types(ws.messages))
    cap = CAPS["ws"]["interrupt"]
    assert got_types[-4:] == squash(types(cap))[-4:]
    assert got_types.count("executing") == types(cap).count("executing") + 3  # nodes 1,2,3 were cached there
    got = next(m for m in ws.messages if m["type"] == "execution_interrupted")["data"]
    want = next(m for m in cap if m["type"] == "execution_interrupted")["data"]
    assert sorted(got) == sorted(want)
    assert got["node_id"] == "7" and got["node_type"] == "KSampler"
    assert sorted(got["executed"]) == ["1", "2", "3", "4", "5", "6"]
    h = history(fake_comfy, prompt_id)
    assert h["status"]["status_str"] == "error" and h["outputs"] == {}
    want_h = CAPS["history"]["interrupt"]["body"]["7d1caf02-dd0d-4aef-8d09-9a06d84fdd81"]
    assert [m[0] for m in h["status"]["messages"]] == [m[0] for m in want_h["status"]["messages"]]
    assert (h["status"]["status_str"], h["status"]["completed"], h["meta"]) == ("error", False, want_h["meta"])
    assert fake_comfy.interrupt_count == 1


def test_interrupt_is_global_and_idle_interrupt_does_not_leak(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    assert requests.post(fake_comfy.url + "/interrupt", timeout=5).status_code == 200  # idle: no effect later
    _, msgs = run(fake_comfy, success_workflow(), "owner")
    assert "execution_success" in types(msgs)
    fake_comfy.hang_next()
    owner = Ws(fake_comfy, "owner")
    prompt_id = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 9}}), "owner").json()["prompt_id"]
    owner.until(lambda m: m["type"] == "progress")
    requests.post(fake_comfy.url + "/interrupt", timeout=5)  # no client id at all: still stops it
    owner.until_done(prompt_id)
    assert "execution_interrupted" in types(owner.messages)
    owner.close()


def test_observers_only_see_status(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    observer = Ws(fake_comfy, "observer")
    run(fake_comfy, success_workflow(), "someone-else")
    fake_comfy.wait_idle()
    observer.conn.settimeout(0.15)
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:
            observer.recv()
    assert types(observer.messages) == types(CAPS["ws"]["observer_post_with_other_client_id"])
    observer.close()


def test_prompt_without_client_id_sends_no_execution_messages(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "warm")  # then everything is cached, as in the probe
    observer = Ws(fake_comfy, "observer")
    r = post_prompt(fake_comfy, success_workflow())
    fake_comfy.wait_idle()
    observer.conn.settimeout(0.15)
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:
            observer.recv()
    assert types(observer.messages) == types(CAPS["ws"]["observer_post_without_client_id"])
    assert history(fake_comfy, r.json()["prompt_id"])["status"]["status_str"] == "success"


def test_new_socket_with_same_client_id_replaces_old(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    old = Ws(fake_comfy, "same")
    new = Ws(fake_comfy, "same")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "same").json()["prompt_id"]
    new.until_done(prompt_id)
    old.conn.settimeout(0.15)
    with pytest.raises(websocket.WebSocketTimeoutException):
        old.recv()
    old.close()
    new.close()


def test_queue_order_front_delete_and_clear(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.hang_next()
    ws = Ws(fake_comfy, "q")
    first = post_prompt(fake_comfy, success_workflow(), "q").json()
    ws.until(lambda m: m["type"] == "progress")
    second = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 2}}), "q").json()
    third = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 3}}), "q", front=True).json()
    assert (first["number"], second["number"], third["number"]) == (0, 1, -2)
    q = requests.get(fake_comfy.url + "/queue", timeout=5).json()
    assert [item[1] for item in q["queue_running"]] == [first["prompt_id"]]
    assert sorted(item[1] for item in q["queue_pending"]) == sorted([second["prompt_id"], third["prompt_id"]])
    assert requests.get(fake_comfy.url + "/prompt", timeout=5).json() == {"exec_info": {"queue_remaining": 3}}
    r = requests.post(fake_comfy.url + "/queue", json={"delete": [second["prompt_id"]]}, timeout=5)
    assert (r.status_code, r.content, r.headers.get("Content-Type")) == (200, b"", None)
    requests.post(fake_comfy.url + "/queue", json={"clear": True}, timeout=5)
    q = requests.get(fake_comfy.url + "/queue", timeout=5).json()
    assert q["queue_pending"] == [] and len(q["queue_running"]) == 1
    requests.post(fake_comfy.url + "/interrupt", timeout=5)
    ws.until_done(first["prompt_id"])
    ws.close()
    statuses = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in ws.messages if m["type"] == "status"]
    cap = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in CAPS["ws"]["queue_pending_delete_clear"]
           if m["type"] == "status"]
    assert statuses == cap
    assert fake_comfy.wait_idle()
    assert requests.get(fake_comfy.url + "/queue", timeout=5).json() == CAPS["misc"]["queue_idle"]["body"]


def test_front_prompt_runs_before_earlier_pending_ones(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.hang_next()
    ws = Ws(fake_comfy, "f")
    first = post_prompt(fake_comfy, success_workflow(), "f").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "progress")
    later = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 2}}), "f").json()["prompt_id"]
    front = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 3}}), "f", front=True).json()["prompt_id"]
    requests.post(fake_comfy.url + "/interrupt", timeout=5)
    for pid in (first, front, later):
        ws.until_done(pid)
    ws.close()


# --- fault injection -----------------------------------------------------------------------------

def test_fail_next_raises_at_run_time(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.fail_next(node="KSampler", message="boom", exception_type="RuntimeError")
    prompt_id, msgs = run(fake_comfy, success_workflow(), "f")
    err = next(m for m in msgs if m["type"] == "execution_error")["data"]
    assert (err["node_id"], err["node_type"], err["exception_message"], err["exception_type"]) == (
        "7", "KSampler", "boom", "RuntimeError")
    assert sorted(err["executed"]) == ["1", "2", "3", "4", "5", "6"]
    assert err["current_inputs"]["seed"] == [1]
    assert history(fake_comfy, prompt_id)["status"]["status_str"] == "error"
    _, msgs = run(fake_comfy, success_workflow(), "f")  # armed for one prompt only
    assert "execution_success" in types(msgs)


def test_fail_next_by_node_id_and_dotted_type(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.fail_next(node="8", message="cuda oom", exception_type="torch.OutOfMemoryError")
    _, msgs = run(fake_comfy, success_workflow(), "f")
    err = next(m for m in msgs if m["type"] == "execution_error")["data"]
    assert (err["node_id"], err["exception_type"]) == ("8", "torch.OutOfMemoryError")


def test_drop_ws_next_cuts_sockets_but_run_completes(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.drop_ws_next(after_progress=2)
    ws = Ws(fake_comfy, "d")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "d").json()["prompt_id"]
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        for _ in range(100):
            ws.recv()
    assert [m["data"]["value"] for m in ws.messages if m["type"] == "progress"] == [1, 2]
    assert history(fake_comfy, prompt_id)["status"]["status_str"] == "success"
    again = Ws(fake_comfy, "d")  # reconnecting works
    assert again.hello["data"]["sid"] == "d"
    again.close()


def test_hang_next_until_interrupt(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.hang_next()
    ws = Ws(fake_comfy, "h")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "h").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "progress")
    assert fake_comfy.running_prompt_id() == prompt_id
    requests.post(fake_comfy.url + "/interrupt", timeout=5)
    ws.until_done(prompt_id)
    assert fake_comfy.running_prompt_id() is None
    # it stalled after its first step until the interrupt: a run that went on would have
    # finished before it (4 steps, no delay) and an interrupt after the end is forgotten
    assert [m["data"]["value"] for m in ws.messages if m["type"] == "progress"] == [1]
    assert "execution_interrupted" in types(ws.messages) and "execution_success" not in types(ws.messages)
    ws.close()


def test_refuse_and_accept_connections_on_the_same_port(fake_comfy):
    port = fake_comfy.port
    session = requests.Session()
    assert session.get(fake_comfy.url + "/system_stats", timeout=5).status_code == 200
    fake_comfy.refuse_connections()
    with pytest.raises(requests.ConnectionError):
        session.get(fake_comfy.url + "/system_stats", timeout=5)
    fake_comfy.accept_connections()
    assert fake_comfy.port == port
    assert session.get(fake_comfy.url + "/system_stats", timeout=5).status_code == 200


def test_die_cuts_everything_and_writes_no_history(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.hang_next()
    ws = Ws(fake_comfy, "x")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "x").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "progress")
    fake_comfy.die()
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(100):
            ws.recv()
    with pytest.raises(requests.ConnectionError):
        requests.get(fake_comfy.url + "/queue", timeout=5)
    fake_comfy.accept_connections()  # "restarted": empty queue and history
    fake_comfy.wait_idle()
    assert requests.get(f"{fake_comfy.url}/history/{prompt_id}", timeout=5).json() == {}
    assert requests.get(fake_comfy.url + "/queue", timeout=5).json() == {"queue_running": [], "queue_pending": []}
    _, msgs = run(fake_comfy, success_workflow(), "x")  # cache was lost too
    assert next(m for m in msgs if m["type"] == "execution_cached")["data"]["nodes"] == []


def test_die_or_stop_during_a_held_history_gap_ends_it_without_history(tmp_path):
    before = set(threading.enumerate())
    with FakeComfyUI(tmp_path / "c") as fake:
        put_inputs(fake, "probe_src_64.png", "probe_mask_64.png")
        fake.history_delay = 3600
        ws = Ws(fake, "g")
        prompt_id = post_prompt(fake, success_workflow(), "g").json()["prompt_id"]
        ws.until(lambda m: m["type"] == "execution_success")
        fake.die()
        assert fake.wait_idle()  # the worker is free again, not waiting out the hour
        fake.accept_connections()
        assert requests.get(f"{fake.url}/history/{prompt_id}", timeout=5).json() == {}
        ws.close()
        ws = Ws(fake, "g")
        post_prompt(fake, success_workflow(**{"7": {"seed": 2}}), "g")
        ws.until(lambda m: m["type"] == "execution_success")
        ws.close()
    # none of the fake's threads is left (threads of earlier tests may end meanwhile: not counted)
    assert set(threading.enumerate()) - before == set()  # the worker did not wait out the hour
    assert fake.running_prompt_id() is not None  # stopped in the gap: no history was written


def test_stop_interrupts_a_hang_and_leaves_no_threads(tmp_path):
    before = set(threading.enumerate())
    fake = FakeComfyUI(tmp_path / "c")
    fake.start()
    put_inputs(fake, "probe_src_64.png", "probe_mask_64.png")
    fake.hang_next()
    ws = Ws(fake, "s")
    post_prompt(fake, success_workflow(), "s")
    ws.until(lambda m: m["type"] == "progress")
    port = fake.port
    fake.stop()
    assert set(threading.enumerate()) - before == set()  # (threads of earlier tests may end meanwhile)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- HTTP details ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path,cap", [("/interrupt", "interrupt_response"), ("/queue", "queue_clear_response"),
                                      ("/free", "free_response")])
def test_empty_bodied_200s(fake_comfy, path, cap):
    want = CAPS["misc"][cap]
    r = requests.post(fake_comfy.url + path, json=want["request"].get("json"), timeout=5)
    assert (r.status_code, r.text, r.headers.get("Content-Type"), r.headers.get("Content-Length")) == (
        want["status"], "", None, "0")


def test_simple_gets_match_capture(fake_comfy):
    for cap in ("prompt_get_idle", "queue_idle", "embeddings", "models_list", "models_checkpoints",
                "object_info_unknown_node", "history_all_initial"):
        want = CAPS["misc"][cap]
        r = requests.get(fake_comfy.url + want["request"]["path"], params=want["request"].get("params"), timeout=5)
        assert (r.status_code, r.headers["Content-Type"], r.json()) == (want["status"], want["content_type"],
                                                                        want["body"]), cap
    stats = requests.get(fake_comfy.url + "/system_stats", timeout=5).json()
    want = CAPS["misc"]["system_stats"]["body"]
    assert sorted(stats) == sorted(want) and sorted(stats["system"]) == sorted(want["system"])
    assert sorted(stats["devices"][0]) == sorted(want["devices"][0])
    assert stats["system"]["comfyui_version"] == "0.3.40"
    assert requests.get(fake_comfy.url + "/api/prompt", timeout=5).json() == {"exec_info": {"queue_remaining": 0}}
    assert requests.get(fake_comfy.url + "/models/nope", timeout=5).status_code == 404


def test_history_max_items_and_unknown_id(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    ids = [run(fake_comfy, success_workflow(**{"7": {"seed": s}}), "h")[0] for s in (1, 2, 3)]
    fake_comfy.wait_idle()
    assert list(requests.get(fake_comfy.url + "/history", params={"max_items": 2}, timeout=5).json()) == ids[1:]
    assert requests.get(fake_comfy.url + "/history/unknown", timeout=5).json() == {}


def _upload(fake, data: bytes, filename="probe_upl.png", field="image", **fields):
    files = {field: (filename, data, "image/png")} if field else None
    return requests.post(fake.url + "/upload/image", files=files, data=fields or None, timeout=5)


def test_upload_image_behaviours_match_captures(fake_comfy):
    by_size = {len((INPUTS / n).read_bytes()): (INPUTS / n).read_bytes()
               for n in ("probe_upl_A.png", "probe_upl_B.png", "probe_upl_C.png")}
    ups = CAPS["uploads"]
    for name in sorted(n for n in ups if n.startswith("upload_image_")):
        cap = ups[name]
        req = cap["request"]
        fields = dict(req["form_fields"])
        if req["file"] is None:
            r = requests.post(fake_comfy.url + "/upload/image", files={"x": ("", b"")}, data=fields, timeout=5)
        else:
            data = (INPUTS / "corrupt_probe.png").read_bytes() if "corrupt" in name else (
                by_size.get(req["file"]["bytes"], b"not an image"))
            assert len(data) == req["file"]["bytes"], name
            r = requests.post(fake_comfy.url + "/upload/image",
                              files={req["file"]["field"]: (req["file"]["filename"], data, req["file"]["content_type"])},
                              data=fields, timeout=5)
        assert r.status_code == cap["status"], name
        assert r.headers.get("Content-Type") == cap["content_type"], name
        if cap["content_type"] and cap["content_type"].startswith("application/json"):
            assert r.json() == cap["body"], name
        else:
            assert r.text == cap["body"], name
    assert (fake_comfy.temp_dir / "probe_upl.png").is_file()
    assert (fake_comfy.output_dir / "probe_sub" / "probe_upl.png").is_file()
    assert (fake_comfy.input_dir / "probe_sub" / "nested" / "probe_upl.png").is_file()
    assert not (fake_comfy.folders.root / "probe_escape").exists()
    names = sorted(p.name for p in fake_comfy.input_dir.iterdir() if p.is_file())
    assert names == ["corrupt_probe.png", "probe_upl (1).png", "probe_upl (2).png", "probe_upl.png",
                     "probe_upl.txt"]


def test_upload_mask_copies_alpha_onto_the_original(fake_comfy):
    put_inputs(fake_comfy, "probe_upl.png")
    mask = (INPUTS / "probe_mask_64.png").read_bytes()
    ref = json.dumps({"filename": "probe_upl.png", "subfolder": "", "type": "input"})
    r = requests.post(fake_comfy.url + "/upload/mask", files={"image": ("probe_mask_editor.png", mask, "image/png")},
                      data={"original_ref": ref, "type": "input", "subfolder": "clipspace", "overwrite": "true"},
                      timeout=5)
    assert r.json() == CAPS["uploads"]["upload_mask_01_with_original_ref"]["body"]
    out = Image.open(fake_comfy.input_dir / "clipspace" / "probe_mask_editor.png")
    assert out.mode == "RGBA" and out.getpixel((32, 32))[3] == 0 and out.getpixel((0, 0))[3] == 255
    r = requests.post(fake_comfy.url + "/upload/mask", files={"image": ("m2.png", mask, "image/png")},
                      data={"type": "input"}, timeout=5)
    assert r.status_code == 500


def test_view_matches_captures(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "v")
    for cap in ("view_output_success", "view_missing_file", "view_bad_type"):
        want = CAPS["misc"][cap]
        r = requests.get(fake_comfy.url + "/view", params=want["request"]["params"], timeout=5)
        assert r.status_code == want["status"], cap
        assert r.headers.get("Content-Type") == want["content_type"], cap
    r = requests.get(fake_comfy.url + "/view", params={"filename": "probe_00001_.png"}, timeout=5)
    assert r.headers["Content-Disposition"] == 'filename="probe_00001_.png"'
    assert r.content == (fake_comfy.output_dir / "probe_00001_.png").read_bytes()
    assert requests.get(fake_comfy.url + "/view", params={"filename": "../x.png"}, timeout=5).status_code == 400
    assert requests.get(fake_comfy.url + "/view", params={"filename": "probe_00001_.png", "subfolder": "../.."},
                        timeout=5).status_code == 403
    assert requests.get(fake_comfy.url + "/view", params={"filename": "probe_00001_.png [output]"},
                        timeout=5).status_code == 200


def test_malformed_queue_json_is_a_500_and_worker_survives(fake_comfy):
    r = requests.post(fake_comfy.url + "/queue", data="{nope", timeout=5)
    assert r.status_code == 500 and r.text == "500 Internal Server Error\n\nServer got itself in trouble"
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    _, msgs = run(fake_comfy, success_workflow(), "ok")
    assert "execution_success" in types(msgs)


def test_origin_mismatch_is_refused(fake_comfy):
    r = requests.get(fake_comfy.url + "/queue", headers={"Origin": "http://127.0.0.1:8080"}, timeout=5)
    assert r.status_code == 403
    r = requests.get(fake_comfy.url + "/queue", headers={"Origin": fake_comfy.url}, timeout=5)
    assert r.status_code == 200


# --- pixel model -----------------------------------------------------------------------------------

def _mask_prompt(image, channel):
    return {"1": {"class_type": "LoadImageMask", "inputs": {"image": image, "channel": channel}},
            "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}}}


def _stripe_values(img: Image.Image, y: int) -> list:
    return [img.convert("RGB").getpixel((x, y))[0] for x in (8, 24, 40, 56)]


@pytest.mark.parametrize("case", sorted(CAPS["mask_semantics"]["LoadImageMask"]))
def test_loadimagemask_semantics_match_capture(fake_comfy, case):
    stem, channel = case.split("/")
    name = f"maskprobe_{stem}.png"
    put_inputs(fake_comfy, name)
    prompt_id, msgs = run(fake_comfy, _mask_prompt(name, channel), "m")
    out = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"][0]
    img = fake_comfy.output_image(out["filename"], out["subfolder"])
    want = CAPS["mask_semantics"]["LoadImageMask"][case]
    assert list(img.size) == want["size"]
    assert _stripe_values(img, 16) == want["top"]
    assert _stripe_values(img, 48) == want["bottom"]


@pytest.mark.parametrize("case", sorted(CAPS["mask_semantics"]["LoadImage_mask_output"]))
def test_loadimage_mask_output_matches_capture(fake_comfy, case):
    name = f"maskprobe_{case}.png"
    put_inputs(fake_comfy, name)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 1]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "lm"}}}
    _, msgs = run(fake_comfy, prompt, "m")
    out = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"][0]
    img = fake_comfy.output_image(out["filename"])
    want = CAPS["mask_semantics"]["LoadImage_mask_output"][case]
    assert list(img.size) == want["size"]
    assert _stripe_values(img, 16) == want["top"] and _stripe_values(img, 48) == want["bottom"]


def _centre_only_changed(src: np.ndarray, out: np.ndarray, box):
    y0, y1, x0, x1 = box
    diff = np.abs(src - out).max(axis=-1)
    inside = np.zeros(diff.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    return diff[~inside].max(), diff[inside].min(), diff[inside].mean()


def test_setlatentnoisemask_changes_only_the_masked_area(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    prompt = copy.deepcopy(CAPS["workflows"]["inpaint_setlatentnoisemask"]["prompt"])
    _, msgs = run(fake_comfy, prompt, "n")
    out = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"][0]
    src = pixels(Image.open(INPUTS / "probe_src_64.png"))
    res = pixels(fake_comfy.output_image(out["filename"]))
    outside_max, _, inside_mean = _centre_only_changed(src, res, (16, 48, 16, 48))
    assert outside_max <= 1  # the float round trip may truncate one level, never more
    assert inside_mean > 10


def test_vaeencodeforinpaint_changes_only_the_grown_mask(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    _, msgs = run(fake_comfy, success_workflow(), "n")
    out = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"][0]
    src = pixels(Image.open(INPUTS / "probe_src_64.png"))
    res = pixels(fake_comfy.output_image(out["filename"]))
    # grow_mask_by 6: box kernel 6 with padding 3, output cropped: output o sees inputs o-3..o+2,
    # so the 16..47 square grows 2 up/left and 3 down/right: 14..50
    outside_max, inside_min, _ = _centre_only_changed(src, res, (14, 51, 14, 51))
    assert outside_max <= 1
    changed = np.abs(src - res).max(axis=-1) > 1
    assert changed[14:51, 14:51].mean() > 0.9


def test_ksampler_is_deterministic_and_denoise_scales_change(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")

    def img2img(seed, denoise, prefix, batch=1):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-random.safetensors"}},
                "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
                "4": {"class_type": "LoadImage", "inputs": {"image": "probe_src_64.png"}},
                "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
                "6": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": batch}},
                "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                           "negative": ["2", 0], "latent_image": ["6", 0],
                                                           "seed": seed, "steps": 2, "cfg": 7.0,
                                                           "sampler_name": "euler", "scheduler": "normal",
                                                           "denoise": denoise}},
                "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
                "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}}

    def outputs(prompt):
        _, msgs = run(fake_comfy, prompt, "k")
        imgs = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"]
        return [pixels(fake_comfy.output_image(i["filename"])) for i in imgs]

    src = pixels(Image.open(INPUTS / "probe_src_64.png"))
    a = outputs(img2img(5, 0.3, "a"))[0]
    b = outputs(img2img(5, 0.3, "b"))[0]  # other prefix: not cached, same seed -> same pixels
    c = outputs(img2img(6, 0.3, "c"))[0]
    d = outputs(img2img(5, 0.9, "d"))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(d - src).mean() > np.abs(a - src).mean() * 2
    b0, b1 = outputs(img2img(5, 1.0, "batch", batch=2))
    assert not np.array_equal(b0, b1)
    assert sorted(p.name for p in fake_comfy.output_dir.glob("batch_*")) == ["batch_00001_.png", "batch_00002_.png"]


def test_lora_and_controlnet_perturb_the_result(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    base = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-random.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                       "latent_image": ["4", 0], "seed": 1, "steps": 1, "cfg": 7.0,
                                                       "sampler_name": "euler", "scheduler": "normal",
                                                       "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "base"}}}
    lora = copy.deepcopy(base)
    lora["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                         "lora_name": "tiny-lora-random.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}}
    lora["7"]["inputs"]["model"] = ["10", 0]
    lora["9"]["inputs"]["filename_prefix"] = "lora"
    cnet = copy.deepcopy(lora)
    cnet["11"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny-controlnet-random.safetensors"}}
    cnet["12"] = {"class_type": "LoadImage", "inputs": {"image": "probe_src_64.png"}}
    cnet["13"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["2", 0], "negative": ["2", 0], "control_net": ["11", 0], "image": ["12", 0], "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0}}
    cnet["7"]["inputs"]["positive"] = ["13", 0]
    cnet["7"]["inputs"]["negative"] = ["13", 1]
    cnet["9"]["inputs"]["filename_prefix"] = "cnet"
    results = []
    for prompt in (base, lora, cnet):
        _, msgs = run(fake_comfy, prompt, "l")
        out = next(m for m in msgs if m["type"] == "executed")["data"]["output"]["images"][0]
        results.append(pixels(fake_comfy.output_image(out["filename"])))
    assert not np.array_equal(results[0], results[1]) and not np.array_equal(results[1], results[2])


def test_save_image_counter_subfolder_and_preview(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    (fake_comfy.output_dir / "job").mkdir()
    (fake_comfy.output_dir / "job" / "shot_00007_.png").write_bytes(b"")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "probe_src_64.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "job/shot"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    prompt_id, msgs = run(fake_comfy, prompt, "s")
    outs = {m["data"]["node"]: m["data"]["output"]["images"][0] for m in msgs if m["type"] == "executed"}
    assert outs["2"] == {"filename": "shot_00008_.png", "subfolder": "job", "type": "output"}
    assert outs["3"]["type"] == "temp" and outs["3"]["filename"].startswith("ComfyUI_temp_")
    assert (fake_comfy.temp_dir / outs["3"]["filename"]).is_file()
    saved = Image.open(fake_comfy.output_dir / "job" / "shot_00008_.png")
    assert json.loads(saved.text["prompt"])["2"]["class_type"] == "SaveImage"
    assert np.array_equal(pixels(saved), pixels(Image.open(INPUTS / "probe_src_64.png")))
    r = requests.get(fake_comfy.url + "/view", params={**outs["3"]}, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"


def test_previews_are_binary_jpeg_frames_after_each_progress(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.send_previews = True
    _, msgs = run(fake_comfy, success_workflow(), "p")
    assert types(msgs) == types(CAPS["ws"]["success_with_previews"])
    frames = [m for m in msgs if isinstance(m, bytes)]
    assert all(f[:8] == bytes.fromhex("0000000100000001") for f in frames)
    assert Image.open(__import__("io").BytesIO(frames[0][8:])).format == "JPEG"


def test_image_nodes_run(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "probe_src_64.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 96,
                                                     "height": 0, "crop": "disabled"}},
        "3": {"class_type": "ImageCrop", "inputs": {"image": ["2", 0], "width": 80, "height": 80, "x": 8, "y": 8}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["4", 0], "left": 8, "top": 0, "right": 8,
                                                              "bottom": 0, "feathering": 4}},
        "6": {"class_type": "LoadImageMask", "inputs": {"image": "probe_mask_64.png", "channel": "alpha"}},
        "7": {"class_type": "GrowMask", "inputs": {"mask": ["6", 0], "expand": 2, "tapered_corners": True}},
        "8": {"class_type": "InvertMask", "inputs": {"mask": ["7", 0]}},
        "9": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["1", 0], "source": ["4", 0], "x": 0,
                                                               "y": 0, "resize_source": True, "mask": ["8", 0]}},
        "10": {"class_type": "ImageToMask", "inputs": {"image": ["9", 0], "channel": "red"}},
        "11": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 32, "height": 32}},
        "12": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.2, "high_threshold": 0.4}},
        "13": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 0]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        "17": {"class_type": "MaskToImage", "inputs": {"mask": ["11", 0]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}},
    }
    prompt_id, msgs = run(fake_comfy, prompt, "img")
    assert "execution_success" in types(msgs), [m for m in msgs if m["type"] == "execution_error"]
    outs = {m["data"]["node"]: m["data"]["output"]["images"][0] for m in msgs if m["type"] == "executed"}
    size = lambda node: Image.open(fake_comfy.temp_dir / outs[node]["filename"]).size  # noqa: E731
    assert size("14") == (96, 80) and size("15") == (64, 64) and size("18") == (32, 32)


# --- more 0.3.40 details ----------------------------------------------------------------------

def test_reconnect_during_run_gets_current_node_without_prompt_id(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.hang_next()
    ws = Ws(fake_comfy, "r")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "r").json()["prompt_id"]
    ws.until(lambda m: m["type"] == "progress")
    ws.close()
    again = Ws(fake_comfy, "r")
    assert again.recv() == {"type": "executing", "data": {"node": "7"}}
    requests.post(fake_comfy.url + "/interrupt", timeout=5)
    again.until_done(prompt_id)
    again.close()


def test_closing_an_older_socket_unregisters_the_client_id(fake_comfy):
    """ComfyUI pops sockets by clientId when one closes, even if a newer one took its place."""
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    old = Ws(fake_comfy, "dup")
    new = Ws(fake_comfy, "dup")
    assert fake_comfy.client_ids() == ["dup"]
    old.close()
    wait_until(lambda: fake_comfy.client_ids() == [], what="the server to handle the older socket's close")
    prompt_id = post_prompt(fake_comfy, success_workflow(), "dup").json()["prompt_id"]
    fake_comfy.wait_idle()
    new.conn.settimeout(0.15)
    seen = []
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:
            seen.append(new.recv()["type"])
    assert seen == []  # not even the status broadcasts: the sid is gone from the registry
    assert history(fake_comfy, prompt_id)["status"]["status_str"] == "success"
    new.close()


def test_prompt_without_client_id_broadcasts_progress(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    observer = Ws(fake_comfy, "observer")
    post_prompt(fake_comfy, success_workflow())
    fake_comfy.wait_idle()
    observer.conn.settimeout(0.15)
    with pytest.raises(websocket.WebSocketTimeoutException):
        while True:
            observer.recv()
    assert types(observer.messages) == ["status", "status", "status"] + ["progress"] * 4 + ["status"]
    assert observer.messages[3]["data"]["node"] is None


def test_free_memory_drops_the_cache(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    run(fake_comfy, success_workflow(), "a")
    r = requests.post(fake_comfy.url + "/free", json={"free_memory": True}, timeout=5)
    assert r.status_code == 200
    fake_comfy.wait_idle()  # the worker applies the flags between prompts
    _, msgs = run(fake_comfy, success_workflow(), "a")
    assert next(m for m in msgs if m["type"] == "execution_cached")["data"]["nodes"] == []
    assert sorted(p.name for p in fake_comfy.output_dir.iterdir()) == ["probe_00001_.png", "probe_00002_.png"]


def test_post_history_delete_and_clear_and_explicit_number(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    r = post_prompt(fake_comfy, success_workflow(), "n", number=7)
    assert r.json()["number"] == 7.0 and isinstance(r.json()["number"], float)
    a = r.json()["prompt_id"]
    b = post_prompt(fake_comfy, success_workflow(**{"7": {"seed": 4}}), "n").json()
    assert b["number"] == 0  # an explicit number does not advance the counter
    fake_comfy.wait_idle()
    requests.post(fake_comfy.url + "/history", json={"delete": [a]}, timeout=5)
    assert list(requests.get(fake_comfy.url + "/history", timeout=5).json()) == [b["prompt_id"]]
    requests.post(fake_comfy.url + "/api/history", json={"clear": True}, timeout=5)
    assert requests.get(fake_comfy.url + "/history", timeout=5).json() == {}


def test_latent_nodes_keep_comfyui_sizes(fake_comfy):
    put_inputs(fake_comfy, "maskprobe_rgb_32x48.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-random.safetensors"}},
        "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 100, "height": 70, "batch_size": 1}},
        "5": {"class_type": "LatentUpscale", "inputs": {"samples": ["4", 0], "upscale_method": "nearest-exact",
                                                        "width": 0, "height": 128, "crop": "disabled"}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": 3, "steps": 10, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 0],
            "latent_image": ["5", 0], "start_at_step": 4, "end_at_step": 7, "return_with_leftover_noise": "disable"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "lat"}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "maskprobe_rgb_32x48.png"}},
        "10": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "enc"}},
    }
    _, msgs = run(fake_comfy, prompt, "lat")
    assert [m["data"]["max"] for m in msgs if m["type"] == "progress"] == [3, 3, 3]
    outs = {m["data"]["node"]: m["data"]["output"]["images"][0]["filename"] for m in msgs if m["type"] == "executed"}
    # EmptyLatentImage 100x70 -> latent 12x8 -> LatentUpscale height 128 -> 16 rows, width round(12*128/64)=24
    assert fake_comfy.output_image(outs["8"]).size == (192, 128)
    assert fake_comfy.output_image(outs["12"]).size == (32, 48)
