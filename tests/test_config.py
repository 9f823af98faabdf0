"""The one configuration story: every environment variable is in one table (dreamlayer.config.env),
docs/configuration.md documents exactly that table, an invalid value stops every entry point at
start with one line naming the variable, its value and what is allowed, and old names still work
with a warning."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import requests

from dreamlayer import PROJECT_ROOT as ROOT
from dreamlayer.config import VARIABLES, Config, ConfigError, DreamLayerConfig, Environment
from dreamlayer.config import env as E
from dreamlayer.launcher import Plan

DOC = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(title: str) -> dict:
    """{first cell without backticks: [cells]} of the table in a section of configuration.md."""
    rows = {}
    for line in _section(title).splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


# ---------------------------------------------------------------------------- the table itself

def test_every_default_parses_and_names_are_unique():
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    aliases = [old for v in VARIABLES for old in v.deprecated]
    assert len(aliases) == len(set(aliases)) and not set(aliases) & set(names)
    for var in VARIABLES:
        assert var.used_by and set(var.used_by) <= {E.IMG2IMG, E.BACKEND, E.LAUNCHER}, var.name
        if var.default is not None:
            var.kind.parse(var.default)  # raises if a default breaks its own rule
        E.default(var.name)


def test_the_dataclass_defaults_are_the_table_defaults():
    assert Config() == Config.from_env({})
    assert DreamLayerConfig() == DreamLayerConfig.from_env({})


def test_docs_table_is_the_code_table():
    rows = _table("Variables")
    assert set(rows) == {v.name for v in VARIABLES} | set(E.SCRIPT_VARIABLES)
    for var in VARIABLES:
        _, used_by, default, allowed, meaning = rows[var.name]
        assert set(used_by.split(", ")) == set(var.used_by), var.name
        assert allowed == var.kind.allowed, var.name
        if var.default:
            assert default.startswith(f"`{var.default}`"), (var.name, default)
        elif var.default == "":
            assert default.startswith("empty"), (var.name, default)
        assert meaning, var.name
    for name in E.SCRIPT_VARIABLES:
        assert rows[name][1] == "start scripts"


def test_docs_deprecated_names_are_the_code_aliases():
    rows = _table("Deprecated names")
    assert {old: cells[1].strip("`") for old, cells in rows.items()} == E.DEPRECATED


def test_script_variables_are_read_by_both_start_scripts():
    sh = (ROOT / "start_dream_layer.sh").read_text()
    bat = (ROOT / "start_dream_layer.bat").read_text()
    for name in E.SCRIPT_VARIABLES:
        assert name in sh and name in bat, name


def test_only_the_config_module_reads_the_environment():
    sources = [p for p in (ROOT / "dreamlayer").rglob("*.py")] + \
        [ROOT / n for n in ("img2img_server.py", "dream_layer.py", "start_dream_layer.py")]
    readers = {str(p.relative_to(ROOT)) for p in sources
               if re.search(r"os\.environ|getenv|from os import environ", p.read_text(encoding="utf-8"))}
    # process.py hands the whole environment on to the ComfyUI child; it reads no setting from it.
    # images.py asks whether a desktop session exists (DISPLAY) before opening a file manager.
    assert readers <= {"dreamlayer/config/env.py", "dreamlayer/comfyui/process.py",
                       "dreamlayer/backend/images.py"}, readers
    images = (ROOT / "dreamlayer" / "backend" / "images.py").read_text(encoding="utf-8")
    assert set(re.findall(r"os\.environ\.get\(\"(\w+)\"\)", images)) == {"DISPLAY", "WAYLAND_DISPLAY"}
    process = (ROOT / "dreamlayer" / "comfyui" / "process.py").read_text(encoding="utf-8")
    assert not re.search(r"os\.environ(\.get|\[)|getenv", process)


def test_every_variable_in_the_table_is_used():
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "dreamlayer").rglob("*.py")
                     if p.name != "env.py")
    for var in VARIABLES:
        assert f'env.get("{var.name}")' in code, var.name


# ---------------------------------------------------------------------------- reading values

def test_empty_means_unset_and_values_are_typed(tmp_path):
    env = Environment({"IMG2IMG_THREADS": "  ", "LOG_LEVEL": "debug", "IMG2IMG_PORT": "0",
                       "IMG2IMG_HOST": "::", "CORS_ORIGINS": "*", "COMFYUI_EXTRA_ARGS": "--cpu 'a b'",
                       "DREAMLAYER_LOG_DIR": "~/dl-logs", "DREAMLAYER_DEMO": "Yes"})
    assert env.get("IMG2IMG_THREADS") == 32 and env.get("LOG_LEVEL") == "DEBUG"
    assert env.get("IMG2IMG_PORT") == 0 and env.get("IMG2IMG_HOST") == "::"
    assert env.get("CORS_ORIGINS") == ("*",) and env.get("COMFYUI_EXTRA_ARGS") == ("--cpu", "a b")
    assert env.get("DREAMLAYER_LOG_DIR") == Path.home() / "dl-logs" and env.get("DREAMLAYER_DEMO") is True
    assert env.get("DREAMLAYER_DEMO_DIR") == ROOT / "data" / "demo_comfyui"  # defaults: in the project
    assert env.get("COMFYUI_DIR") is None and env.warnings == []


BAD = [
    ("IMG2IMG_THREADS", "many", "a whole number >= 1"),
    ("IMG2IMG_THREADS", "0", "a whole number >= 1"),
    ("IMG2IMG_THREADS", "1_000", "a whole number >= 1"),
    ("IMG2IMG_PORT", "70000", "a port number 0-65535"),
    ("IMG2IMG_PORT", "-1", "a port number 0-65535"),
    ("DREAMLAYER_PORT", "http", "a port number 0-65535"),
    ("COMFY_TIMEOUT_S", "-1", "a number of seconds > 0"),
    ("COMFY_TIMEOUT_S", "nan", "a number of seconds > 0"),
    ("IMG2IMG_JOB_TTL_S", "1h", "a number of seconds > 0"),
    ("LOG_LEVEL", "VERBOSE", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("COMFY_API_URL", "127.0.0.1:8188", "one or more comma-separated http:// or https:// URLs"),
    ("COMFY_API_URL", "ftp://host", "one or more comma-separated http:// or https:// URLs"),
    ("COMFY_API_URL", "http://host:99999", "one or more comma-separated http:// or https:// URLs"),
    ("COMFY_API_URL", "http://a:1,,http://b:2", "one or more comma-separated http:// or https:// URLs"),
    ("COMFY_API_URL", "http://a:1,http://a:1", "one or more comma-separated http:// or https:// URLs"),
    # one server spelt two ways counts double against COMFY_PROMPTS_PER_BACKEND
    ("COMFY_API_URL", "http://127.0.0.1:1,http://localhost:1", "a server is listed twice"),
    ("COMFY_API_URL", "http://a:1,HTTP://A:1/api/", "a server is listed twice"),
    ("COMFY_API_URL", "http://a:80,http://a", "a server is listed twice"),
    ("COMFY_API_URL", "http://a:1?x=1", "no user:password, query or fragment"),
    ("COMFY_PROMPTS_PER_BACKEND", "0", "a whole number >= 1"),
    ("PUBLIC_BASE_URL", "http://", "an http:// or https:// URL"),
    ("CORS_ORIGINS", "http://a:1, http://b/app", "'http://b/app' is not an origin"),
    ("CORS_ORIGINS", ",", "comma-separated origins"),
    ("COMFYUI_CORS_ORIGIN", "localhost", "an origin"),
    ("DREAMLAYER_DEMO", "maybe", "1, true, yes, on or 0, false, no, off"),
    ("IMG2IMG_IMAGES", "disk", "redis or folder"),
    ("IMG2IMG_ROLE", "primary", "both, api or worker"),
    ("IMG2IMG_HOST", "http://0.0.0.0", "without scheme or port"),
    ("DREAMLAYER_HOST", "localhost:5002", "without scheme or port"),
    ("COMFYUI_EXTRA_ARGS", '--output "unclosed', "command-line arguments"),
    ("MAX_MASK_BYTES", "10MB", "a whole number >= 1"),
    ("COMFYUI_START_TIMEOUT_S", "0", "a number of seconds > 0"),
    ("DREAMLAYER_HEALTH_TIMEOUT_S", "soon", "a number of seconds > 0"),
]


@pytest.mark.parametrize("name, value, allowed", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_an_invalid_value_names_the_variable_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as info:
        Plan.from_env(False, {name: value})  # the launcher builds every configuration
    assert str(info.value).startswith(f"{name}={value!r}: expected ")
    assert allowed in str(info.value)


def test_the_api_key_is_never_shown():
    var = E.BY_NAME["IMG2IMG_API_KEY"]
    assert var.secret
    assert E._message(var, var.name, "s3cret", ValueError()) == "IMG2IMG_API_KEY='***': expected any text"


def test_a_password_in_comfyuis_address_is_refused_and_never_shown():
    """It would be shown to anyone in /health (open without the API key) and in error messages."""
    with pytest.raises(ConfigError) as info:
        Plan.from_env(False, {"COMFY_API_URL": "http://127.0.0.1:1,http://admin:s3cret@127.0.0.1:2"})
    assert "s3cret" not in str(info.value) and "admin" not in str(info.value)
    assert "no user:password" in str(info.value)


def test_replace_checks_like_from_env():
    with pytest.raises(ConfigError, match=r"IMG2IMG_PORT='70000': expected a port number"):
        Config().replace(port=70000)
    with pytest.raises(ConfigError, match=r"COMFY_TIMEOUT_S='0': expected a number of seconds"):
        Config().replace(comfy_timeout_s=0)
    assert Config().replace(port=0).port == 0


def test_the_launcher_needs_fixed_ports():
    for name in ("DREAMLAYER_PORT", "IMG2IMG_PORT"):
        with pytest.raises(ConfigError, match=rf"{name}='0': expected a port number 1-65535"):
            Plan.from_env(False, {name: "0"})
    plan = Plan.from_env(True, {"DREAMLAYER_HEALTH_TIMEOUT_S": "5", "DREAMLAYER_DEMO_DIR": "/tmp/demo",
                                "COMFYUI_START_TIMEOUT_S": "7", "PATH": "/bin"})
    assert (plan.health_timeout_s, plan.demo_dir, plan.dl.comfyui_start_timeout_s) == (5.0, Path("/tmp/demo"), 7.0)
    assert plan.environ["PATH"] == "/bin"  # what the children inherit


# ---------------------------------------------------------------------------- deprecated names

@pytest.mark.parametrize("old, new, value, attr", [
    ("DREAM_LAYER_HOST", "DREAMLAYER_HOST", "0.0.0.0", lambda p: p.dl.host),
    ("DREAM_LAYER_PORT", "DREAMLAYER_PORT", "6002", lambda p: p.dl.port),
    ("DREAM_LAYER_THREADS", "DREAMLAYER_THREADS", "3", lambda p: p.dl.threads),
    ("COMFYUI_START_TIMEOUT", "COMFYUI_START_TIMEOUT_S", "9", lambda p: p.dl.comfyui_start_timeout_s),
    ("DREAMLAYER_HEALTH_TIMEOUT", "DREAMLAYER_HEALTH_TIMEOUT_S", "9", lambda p: p.health_timeout_s),
])
def test_an_old_name_still_works_with_one_warning(old, new, value, attr):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: rename it to {new}"):
        plan = Plan.from_env(False, {old: value})
    assert str(attr(plan)) in (value, f"{value}.0")
    assert plan.warnings == (f"{old} is deprecated: rename it to {new} (docs/configuration.md)",)
    # both set: the new name wins, and the warning says the old one is ignored
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated and ignored because {new} is also set"):
        plan = Plan.from_env(False, {old: "bad value", new: value})
    assert str(attr(plan)) in (value, f"{value}.0") and len(plan.warnings) == 1


def test_an_invalid_value_under_an_old_name_says_which_variable_it_stands_for():
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as info:
        DreamLayerConfig.from_env({"DREAM_LAYER_PORT": "abc"})
    assert str(info.value).startswith("DREAM_LAYER_PORT='abc' (deprecated name of DREAMLAYER_PORT): expected a port")


def test_unknown_own_variables_are_reported_with_the_closest_name(caplog):
    env = Environment({"IMG2IMG_THEADS": "4", "DREAMLAYER_VENV": "/v", "HOME": "/root", "DREAMLAYER_FOO": "1"})
    assert env.warnings == [
        "DREAMLAYER_FOO is not a DreamLayer setting and is ignored (docs/configuration.md)",
        "IMG2IMG_THEADS is not a DreamLayer setting and is ignored; did you mean IMG2IMG_THREADS? "
        "(docs/configuration.md)"]
    with caplog.at_level(logging.WARNING, logger="dreamlayer.config.env"):
        env.log_warnings()
        env.log_warnings()  # each note once
    assert [r.getMessage() for r in caplog.records] == env.warnings


# ---------------------------------------------------------------------------- the entry points

def _clean_env(**extra) -> dict:
    """The test runner's environment without any DreamLayer variable, plus ``extra``."""
    own = {v.name for v in VARIABLES} | set(E.DEPRECATED)
    env = {k: v for k, v in os.environ.items() if k not in own and not k.startswith(E.OWN_PREFIXES)}
    env.update(extra)
    return env


def _run(script: str, *args, **variables) -> subprocess.CompletedProcess:
    # a timeout kills the process should a bad value be accepted after all (it would then serve)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=_clean_env(**variables),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script, program, name, value", [
    ("dream_layer.py", "dream_layer", "IMG2IMG_THREADS", "many"),
    ("dream_layer.py", "dream_layer", "LOG_LEVEL", "VERBOSE"),
    ("img2img_server.py", "img2img_server", "IMG2IMG_PORT", "70000"),
    ("img2img_server.py", "img2img_server", "COMFY_TIMEOUT_S", "-1"),
    ("img2img_server.py", "img2img_server", "PUBLIC_BASE_URL", "localhost:5004"),
    ("start_dream_layer.py", "start_dream_layer", "COMFY_API_URL", "127.0.0.1:8188"),
    ("start_dream_layer.py", "start_dream_layer", "DREAMLAYER_PORT", "0"),
])
def test_entry_points_stop_with_one_line_and_exit_code_2(script, program, name, value):
    result = _run(script, **{name: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert lines[0].startswith(f"{program}: invalid configuration value {name}={value!r}: expected ")
    assert lines[0].endswith("(see docs/configuration.md)")


def test_the_error_examples_in_the_docs_are_what_the_programs_say():
    block = _section("Errors").split("```", 2)[1].strip().splitlines()
    examples = [(block[i], block[i + 1]) for i in range(len(block) - 1) if block[i].startswith("$ ")]
    assert len(examples) == 3
    for command, said in examples:
        name, value = re.match(r"\$ (\w+)=(\S+) ", command).groups()
        program = said.split(":", 1)[0]
        with pytest.raises(ConfigError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            Plan.from_env(False, {name: value})
        assert E.error_line(program, info.value) == said


def test_a_service_logs_the_deprecation_warning():
    # --comfyui-only without COMFYUI_DIR stops right after logging is set up: no port is opened
    result = _run("dream_layer.py", "--comfyui-only", DREAM_LAYER_PORT="6002",
                  COMFY_API_URL="http://127.0.0.1:1")
    assert result.returncode == 2 and "COMFYUI_DIR is not set" in result.stderr
    assert re.search(r"WARNING dreamlayer\.config\.env: DREAM_LAYER_PORT is deprecated: rename it to "
                     r"DREAMLAYER_PORT", result.stderr), result.stderr


def test_port_0_lets_the_system_choose_and_the_log_names_the_port(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "dream_layer.py")], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, env=_clean_env(DREAMLAYER_PORT="0", COMFY_API_URL="http://127.0.0.1:1",
                                                      SERVED_IMAGES_DIR=str(tmp_path / "served"),
                                                      DREAMLAYER_SETTINGS_FILE=str(tmp_path / "s.json")))
    try:
        port = None
        for line in proc.stderr:  # the line comes within a second; the test timeout bounds it
            match = re.search(r"dream_layer on http://127\.0\.0\.1:(\d+) ", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "no 'dream_layer on' line"
        assert port != 0 and requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_the_package_never_imports_from_the_tests():
    """The package runs from a clone without tests/ on the path (the service, the demo)."""
    import ast
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests", "corpus"}
    offenders = []
    for path in (ROOT / "dreamlayer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in test_modules]
    assert offenders == []
