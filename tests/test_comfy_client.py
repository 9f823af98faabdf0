"""Tests of comfy_client: captured ComfyUI 0.3.40 traces replayed through the pure message handling,
then the whole client over real sockets against the fake ComfyUI (tests/fake_comfyui)."""
import json
import pathlib

import pytest

import comfy_client
from comfy_client import (ComfyClient, ComfyExecutionFailed, ComfyInterrupted, Done, OutputImage,
                          Progress, PromptWatch, raise_for_history)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TRACES = FIXTURES / "ws_traces"

SUCCESS_ID = "1b0e1920-3087-4d33-99e8-050fe6152d5e"
ERROR_ID = "8494cdc4-cd12-4f12-917a-c54e4ccd155d"
INTERRUPT_ID = "7d1caf02-dd0d-4aef-8d09-9a06d84fdd81"
CACHED_ID = "dea6190c-91e0-45f7-ae72-4aa9c71eb386"
PREVIEWS_ID = "5dc53724-a692-4d38-a370-e9878f07a05b"


# ------------------------------------------------------------------ helpers for replay

def frames(name):
    """The trace's frames as the socket delivered them: JSON text, or bytes for binary frames."""
    out = []
    for line in (TRACES / f"{name}.jsonl").read_text().splitlines():
        msg = json.loads(line)
        if msg.get("binary"):
            head = bytes.fromhex(msg["first8"])
            out.append(head + b"\xff\xd8" + bytes(msg["len"] - len(head) - 2))
        else:
            out.append(line)
    return out


def replay(prompt_id, frame_list):
    """Feed frames to a PromptWatch like run() does: stop at Done. Returns (events, done, rest)."""
    watch = PromptWatch(prompt_id)
    events = []
    for i, frame in enumerate(frame_list):
        event = watch.handle(frame)
        if isinstance(event, Done):
            return events, event, frame_list[i + 1:], watch
        if event is not None:
            events.append(event)
    return events, None, [], watch


def history(name):
    return json.loads((FIXTURES / "history" / f"{name}.json").read_text())


# ------------------------------------------------------------------ replay of captured traces

def test_success_trace_reports_queue_start_nodes_progress_and_finishes_on_execution_success():
    events, done, rest, watch = replay(SUCCESS_ID, frames("ws_success"))
    assert done == Done(SUCCESS_ID, "execution_success")
    kinds = [e.kind for e in events]
    # the connect greeting (status with sid) predates our prompt and is not reported
    assert kinds[:4] == ["queued", "queued", "started", "cached"]
    assert [e.queue_remaining for e in events[:2]] == [1, 1]
    assert [e.node for e in events if e.kind == "executing"] == ["1", "5", "4", "6", "3", "2", "7", "8", "9"]
    assert [(e.value, e.max, e.node) for e in events if e.kind == "progress"] == [
        (1, 4, "7"), (2, 4, "7"), (3, 4, "7"), (4, 4, "7")]
    assert all(e.prompt_id == SUCCESS_ID for e in events)
    # the trailing status and executing-null are left unread once execution_success arrived
    assert len(rest) == 2
    assert watch.outputs == {"9": {"images": [{"filename": "probe_00001_.png", "subfolder": "", "type": "output"}]}}


def test_older_servers_finish_on_executing_null():
    """Servers before execution_success existed only send executing {node: null}."""
    old = [f for f in frames("ws_success") if json.loads(f)["type"] != "execution_success"]
    events, done, rest, _ = replay(SUCCESS_ID, old)
    assert done == Done(SUCCESS_ID, "executing_null")
    assert rest == []
    assert sum(e.kind == "progress" for e in events) == 4


def test_exec_error_trace_raises_with_node_and_exception():
    watch = PromptWatch(ERROR_ID)
    seen = []
    with pytest.raises(ComfyExecutionFailed) as info:
        for frame in frames("ws_exec_error"):
            seen.append(watch.handle(frame))
    err = info.value
    assert (err.node_id, err.node_type) == ("4", "LoadImage")
    assert err.exception_type == "PIL.UnidentifiedImageError"
    assert err.exception_message == "cannot identify image file '/srv/ComfyUI/input/corrupt_probe.png'"
    assert "node 4 (LoadImage)" in str(err) and "cannot identify image file" in str(err)
    assert err.traceback and (err.status, err.code) == (502, "comfyui_execution_error")
    assert [e.nodes for e in seen if isinstance(e, Progress) and e.kind == "cached"] == [("1", "2", "3", "5")]
    assert len(seen) == 6  # raised on the 7th frame, before status / executing-null


def test_interrupt_trace_raises_interrupted_with_node():
    watch = PromptWatch(INTERRUPT_ID)
    progress = []
    with pytest.raises(ComfyInterrupted) as info:
        for frame in frames("ws_interrupt"):
            event = watch.handle(frame)
            if isinstance(event, Progress) and event.kind == "progress":
                progress.append(event.value)
    assert (info.value.node_id, info.value.node_type) == ("7", "KSampler")
    assert (info.value.status, info.value.code) == (409, "interrupted")
    assert progress == [1, 2, 3]


def test_cached_trace_finishes_without_progress_and_keeps_the_old_file_name():
    events, done, _, watch = replay(CACHED_ID, frames("ws_cached"))
    assert done.signal == "execution_success"
    assert [e.kind for e in events] == ["queued", "queued", "started", "cached"]
    assert events[-1].nodes == tuple(str(i) for i in range(1, 10))
    assert watch.outputs["9"]["images"][0]["filename"] == "probe_00001_.png"


def test_previews_trace_binary_frames_are_ignored():
    frame_list = frames("ws_success_with_previews")
    binary = [f for f in frame_list if isinstance(f, bytes)]
    assert len(binary) == 4 and all(len(b) > 27000 for b in binary)
    watch = PromptWatch(PREVIEWS_ID)
    assert all(watch.handle(b) is None for b in binary)
    events, done, _, _ = replay(PREVIEWS_ID, frame_list)
    assert done.signal == "execution_success"
    assert [e.value for e in events if e.kind == "progress"] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["ws_observer_post_with_other_client_id",
                                  "ws_observer_post_without_client_id",
                                  "ws_validation_errors"])
def test_observer_traces_never_finish_or_raise(name):
    """A socket watching someone else's prompt sees only status: never done, never an error."""
    events, done, _, _ = replay("some-other-prompt", frames(name))
    assert done is None
    assert all(e.kind == "queued" for e in events)


@pytest.mark.parametrize("name", ["ws_success", "ws_exec_error", "ws_interrupt", "ws_cached",
                                  "ws_success_with_previews", "ws_queue_pending_delete_clear"])
def test_messages_of_another_prompt_are_ignored(name):
    """Including execution_interrupted, which 0.3.40 broadcasts to every socket."""
    events, done, _, watch = replay("not-" + name, frames(name))
    assert done is None
    assert {e.kind for e in events} <= {"queued"}
    assert watch.outputs == {}


def test_interleaved_other_prompt_does_not_disturb_ours():
    """Our successful run, with another prompt's interrupt trace woven in (minus the greetings)."""
    ours = frames("ws_success")
    other = [f for f in frames("ws_interrupt") if json.loads(f)["type"] != "status"]
    mixed = []
    for i in range(max(len(ours), len(other))):
        mixed += ours[i:i + 1] + other[i:i + 1]
    events, done, _, _ = replay(SUCCESS_ID, mixed)
    assert done == Done(SUCCESS_ID, "execution_success")
    assert [(e.value, e.max) for e in events if e.kind == "progress"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(e.prompt_id == SUCCESS_ID for e in events)
    # and the other prompt, fed the same stream, is interrupted, not finished by our success
    with pytest.raises(ComfyInterrupted):
        replay(INTERRUPT_ID, mixed)


def test_twenty_step_trace_reports_every_step():
    frame_list = frames("ws_success_256_20steps")
    pid = next(json.loads(f)["data"]["prompt_id"] for f in frame_list
               if json.loads(f)["type"] == "execution_start")
    events, done, _, _ = replay(pid, frame_list)
    assert done.signal == "execution_success"
    assert [e.value for e in events if e.kind == "progress"] == list(range(1, 21))
    assert {e.max for e in events if e.kind == "progress"} == {20}


def test_handler_tolerates_junk():
    watch = PromptWatch("p")
    for junk in ["not json", "[1,2]", '{"type": "executing"}', '{"type": "executing", "data": 3}',
                 b"", bytearray(b"\x00\x00\x00\x01"), '{"type": "progress_state", "data": {"prompt_id": "p", "nodes": {}}}']:
        assert watch.handle(junk) is None
    # decoded dicts are accepted too
    assert watch.handle({"type": "execution_success", "data": {"prompt_id": "p"}}) == Done("p", "execution_success")


# ------------------------------------------------------------------ history entries (pure)

def test_output_images_from_captured_history():
    entry = history("success")[SUCCESS_ID]
    assert ComfyClient.output_images(entry) == [OutputImage("9", "probe_00001_.png", "", "output")]
    raise_for_history(SUCCESS_ID, entry)  # success: no exception


def test_output_images_every_node_in_numeric_node_order():
    entry = {"outputs": {
        "10": {"images": [{"filename": "b_00001_.png", "subfolder": "x", "type": "output"}]},
        "9": {"images": [{"filename": "a_00001_.png", "subfolder": "", "type": "output"},
                         {"filename": "a_00002_.png", "subfolder": "", "type": "output"}]},
        "3": {"text": ["not an image"]},
        "12": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]}}}
    assert [(i.node_id, i.filename, i.subfolder, i.type) for i in ComfyClient.output_images(entry)] == [
        ("9", "a_00001_.png", "", "output"), ("9", "a_00002_.png", "", "output"),
        ("10", "b_00001_.png", "x", "output"), ("12", "p.png", "", "temp")]
    assert ComfyClient.output_images({"outputs": {}}) == []


def test_history_error_entries_map_to_the_websocket_exceptions():
    with pytest.raises(ComfyExecutionFailed) as info:
        raise_for_history(ERROR_ID, history("exec_error")[ERROR_ID])
    assert (info.value.node_id, info.value.node_type) == ("4", "LoadImage")
    assert info.value.exception_type == "PIL.UnidentifiedImageError"
    with pytest.raises(ComfyInterrupted) as info:
        raise_for_history(INTERRUPT_ID, history("interrupt")[INTERRUPT_ID])
    assert (info.value.node_id, info.value.node_type) == ("7", "KSampler")
    cached = history("cached")[CACHED_ID]
    raise_for_history(CACHED_ID, cached)
    assert [i.filename for i in ComfyClient.output_images(cached)] == ["probe_00001_.png"]
    assert history("unknown_id") == {}


def test_error_classes_carry_status_and_code():
    cases = [
        (comfy_client.ComfyUnreachable("http://h:1", "connection refused"), 503, "comfyui_unreachable"),
        (comfy_client.ComfyRejected({"type": "x", "message": "m"}, {}), 502, "comfyui_rejected_workflow"),
        (ComfyExecutionFailed("4", "LoadImage", "boom", "E"), 502, "comfyui_execution_error"),
        (ComfyInterrupted("7", "KSampler", "p"), 409, "interrupted"),
        (comfy_client.ComfyTimeout(5), 504, "comfyui_timeout"),
        (comfy_client.ComfyBadResponse("odd"), 502, "comfyui_bad_response"),
    ]
    for err, status, code in cases:
        assert isinstance(err, comfy_client.ComfyError)
        assert (err.status, err.code) == (status, code)
        assert err.to_dict()["code"] == code and err.to_dict()["message"] == str(err)
    assert "http://h:1" in str(cases[0][0])


def test_ws_url_follows_base_url():
    assert ComfyClient("http://127.0.0.1:8188/").ws_url("abc") == "ws://127.0.0.1:8188/ws?clientId=abc"
    assert ComfyClient("https://x.example/comfy").ws_url("a b") == "wss://x.example/comfy/ws?clientId=a%20b"
