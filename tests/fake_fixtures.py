"""pytest fixtures: started FakeComfyUI servers per test (loaded via pytest_plugins in tests/conftest.py)."""
import pytest

from dreamlayer.comfyui.fake import FakeComfyUI


def _started(folder):
    fake = FakeComfyUI(folder)
    fake.start()
    return fake


@pytest.fixture
def fake_comfy(tmp_path):
    fake = _started(tmp_path / "comfy")
    yield fake
    fake.stop()


@pytest.fixture
def second_comfy(tmp_path):
    """A second backend, for the tests of several ComfyUI servers (COMFY_API_URL lists both)."""
    fake = _started(tmp_path / "comfy-b")
    yield fake
    fake.stop()


def execution_error(fake, workflow: dict):
    """Run ``workflow`` on ``fake`` straight through a ComfyClient; the ComfyExecutionFailed it
    ends with (a failure if it runs)."""
    from dreamlayer.comfyui.client import ComfyClient, ComfyExecutionFailed
    client = ComfyClient(fake.url)
    try:
        with pytest.raises(ComfyExecutionFailed) as info:
            client.run(workflow, timeout=30)
    finally:
        client.close()
    return info.value
