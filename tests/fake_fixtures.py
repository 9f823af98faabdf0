"""pytest fixture: a started FakeComfyUI per test (loaded via pytest_plugins in tests/conftest.py)."""
import pytest

from dreamlayer.comfyui.fake import FakeComfyUI


@pytest.fixture
def fake_comfy(tmp_path):
    fake = FakeComfyUI(tmp_path / "comfy")
    fake.start()
    yield fake
    fake.stop()
