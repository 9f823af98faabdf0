"""The shared path settings: validation, atomic persistence, get_directories(); and display names."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from dreamlayer.config import saved_paths as ds
from dreamlayer.config.env import Environment
from dreamlayer.backend.models import derived_display_name, load_display_names, model_entries


def test_settings_file_location_from_env(tmp_path):
    # the location is configuration (dreamlayer.config.env), handed to this module
    from dreamlayer import PROJECT_ROOT
    assert Environment({}).get("DREAMLAYER_SETTINGS_FILE") == PROJECT_ROOT / "data" / "settings.json"
    assert Environment({"DREAMLAYER_SETTINGS_FILE": str(tmp_path / "s.json")}).get("DREAMLAYER_SETTINGS_FILE") == tmp_path / "s.json"


def test_demo_flag_and_health_fields():
    assert not Environment({}).get("DREAMLAYER_DEMO")
    assert not Environment({"DREAMLAYER_DEMO": "0"}).get("DREAMLAYER_DEMO")
    assert Environment({"DREAMLAYER_DEMO": "1"}).get("DREAMLAYER_DEMO")
    assert ds.demo_health_fields(False) == {}
    fields = ds.demo_health_fields(True)
    assert fields["demo"] is True and "no diffusion model" in fields["note"]


@pytest.mark.parametrize("value, message", [
    ("relative/dir", "must be an absolute path"),
    ("~/outputs", "must be an absolute path"),
    (12, "must be a string"),
    ("/definitely/not/here/xyz", "does not exist"),
])
def test_check_directory_rejects(value, message):
    with pytest.raises(ds.SettingsError, match=message) as info:
        ds.check_directory("outputDirectory", value)
    assert info.value.field == "outputDirectory"


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_check_directory_checks_the_path_it_saves(tmp_path):
    """"<link>/../x" exists through the link (its target's parent has x) while the saved, normalized
    "<dir>/x" does not: refused, not saved pointing nowhere."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").mkdir()
    (tmp_path / "sl").mkdir()
    (tmp_path / "sl" / "link").symlink_to(tmp_path / "a" / "b")
    tricky = f"{tmp_path}/sl/link/../x"
    assert os.path.isdir(tricky)
    with pytest.raises(ds.SettingsError, match="does not exist"):
        ds.check_directory("outputDirectory", tricky)
    assert ds.check_directory("outputDirectory", f"{tmp_path}/a/b/../x") == tmp_path / "a" / "x"


def test_check_directory_rejects_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ds.SettingsError, match="is not a directory"):
        ds.check_directory("modelsDirectory", str(f))


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root can write anywhere")
def test_check_directory_rejects_read_only(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ds.SettingsError, match="not writable"):
            ds.check_directory("outputDirectory", str(d))
    finally:
        d.chmod(stat.S_IRWXU)


def test_check_directory_read_only_as_root(tmp_path, monkeypatch):
    """The writability check goes through os.access, so it holds for any user (root included)."""
    monkeypatch.setattr(ds.os, "access", lambda path, mode: False)
    with pytest.raises(ds.SettingsError, match="not writable"):
        ds.check_directory("outputDirectory", str(tmp_path))


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757])
def test_check_directory_rejects_a_folder_others_can_write(tmp_path, mode):
    """Anyone on the machine may POST the settings: a folder others can fill (a world-writable
    one, say) would hand them what ComfyUI loads from it — custom_nodes under --base-directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ds.SettingsError, match="can be written by other users"):
        ds.check_directory("modelsDirectory", str(shared))
    shared.chmod(0o775)  # group-writable: every folder of a user-private group (umask 002)
    assert ds.check_directory("modelsDirectory", str(shared)) == shared


def test_update_merges_keeps_placeholders_and_resets_on_empty(tmp_path):
    out, models = tmp_path / "out", tmp_path / "models"
    out.mkdir(), models.mkdir()
    path = tmp_path / "cfg" / "settings.json"
    saved, warnings = ds.update_settings(path, {"outputDirectory": str(out), "modelsDirectory": str(models)})
    assert saved == {"outputDirectory": str(out), "modelsDirectory": str(models)}
    assert json.loads(path.read_text()) == saved and warnings == []

    # what the unchanged frontend sends: its placeholders mean "leave as is"
    frontend = {"outputDirectory": "/path/to/outputs", "modelsDirectory": "/path/to/parent/of/models",
                "controlNetModelsPath": "/path/to/models/ControlNet", "saveMetadata": True,
                "filenameFormat": "paste the path if it is outside project root"}
    saved, warnings = ds.update_settings(path, frontend)
    assert saved == {"outputDirectory": str(out), "modelsDirectory": str(models)}
    assert any("saveMetadata" in w for w in warnings)

    saved, _ = ds.update_settings(path, {"modelsDirectory": ""})
    assert saved == {"outputDirectory": str(out)}
    saved, _ = ds.update_settings(path, {"outputDirectory": None})
    assert saved == {}


def test_invalid_update_changes_nothing(tmp_path):
    path = tmp_path / "settings.json"
    ds.update_settings(path, {"outputDirectory": str(tmp_path)})
    before = path.read_bytes()
    with pytest.raises(ds.SettingsError):
        ds.update_settings(path, {"outputDirectory": str(tmp_path), "modelsDirectory": "nope"})
    assert path.read_bytes() == before


def test_unknown_keys_are_named(tmp_path):
    _, warnings = ds.update_settings(tmp_path / "s.json", {"colour": "blue"})
    assert warnings == ["Unknown settings ignored: colour"]


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    ds.save_settings(path, {"outputDirectory": "/a"})

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ds.os, "replace", crash)
    with pytest.raises(OSError):
        ds.save_settings(path, {"outputDirectory": "/b"})
    assert json.loads(path.read_text()) == {"outputDirectory": "/a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]


def test_get_directories_defaults(tmp_path):
    missing = tmp_path / "none.json"
    assert ds.get_directories(missing) == ds.Directories(None, None)
    comfy = tmp_path / "ComfyUI"
    assert ds.get_directories(missing, comfy) == ds.Directories(comfy / "output", None)


def test_get_directories_from_saved_settings(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"outputDirectory": str(tmp_path / "out"), "modelsDirectory": str(models)}))
    dirs = ds.get_directories(path, tmp_path / "ComfyUI")
    assert dirs == ds.Directories(tmp_path / "out", models)
    assert dirs.to_dict() == {"output_directory": str(tmp_path / "out"), "models_directory": str(models)}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]",
                                     json.dumps({"outputDirectory": "relative", "modelsDirectory": 3}),
                                     json.dumps({"outputDirectory": "/path/to/outputs"})])
def test_get_directories_survives_bad_files(tmp_path, content):
    path = tmp_path / "settings.json"
    path.write_text(content)
    assert ds.get_directories(path, tmp_path / "C") == ds.Directories(tmp_path / "C" / "output", None)


def test_vanished_models_directory_is_dropped(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"modelsDirectory": str(tmp_path / "gone")}))
    assert ds.get_directories(path).models_dir is None


# ---------------------------------------------------------------------------- display names

@pytest.mark.parametrize("filename, name", [
    ("tiny-sd15-random.safetensors", "Tiny Sd15 Random"),
    ("v1-5-pruned-emaonly.ckpt", "V1 5 Pruned Emaonly"),
    ("RealESRGAN_x4plus.pth", "Realesrgan X4plus"),
    ("SD1.5/dreamshaper_8.safetensors", "Dreamshaper 8"),
    ("sdxl\\juggernaut-xl.safetensors", "Juggernaut Xl"),
    ("noextension", "Noextension"),
])
def test_derived_display_name(filename, name):
    assert derived_display_name(filename) == name


def test_display_names_file_overrides(tmp_path):
    f = tmp_path / "model_display_names.json"
    f.write_text(json.dumps({"tiny-sd15-random.safetensors": "My Tiny Model", "bad": 3, "blank": " "}))
    names = load_display_names(f)
    assert names == {"tiny-sd15-random.safetensors": "My Tiny Model"}
    assert model_entries(["tiny-sd15-random.safetensors", "other-model.ckpt"], names) == [
        {"id": "tiny-sd15-random.safetensors", "name": "My Tiny Model", "filename": "tiny-sd15-random.safetensors"},
        {"id": "other-model.ckpt", "name": "Other Model", "filename": "other-model.ckpt"},
    ]


def test_broken_display_names_file_is_ignored(tmp_path):
    f = tmp_path / "names.json"
    f.write_text("{oops")
    assert load_display_names(f) == {}
    assert load_display_names(tmp_path / "missing.json") == {}
    assert load_display_names(None) == {}
