#!/usr/bin/env bash
# Start DreamLayer's backend on Linux / macOS: ComfyUI (when COMFYUI_DIR is set and none answers),
# dream_layer.py (:5002) and img2img_server.py (:5004). Ctrl-C stops everything it started.
#
#   ./start_dream_layer.sh            use the ComfyUI at COMFY_API_URL (several: comma-separated, one per GPU; or start COMFYUI_DIR's)
#   ./start_dream_layer.sh --demo     use the project's fake ComfyUI (no GPU, no model)
#   ./start_dream_layer.sh --no-install   do not run pip (same as DREAMLAYER_SKIP_INSTALL=1)
#
# This script prepares the virtualenv, then hands over (exec) to start_dream_layer.py, which
# starts, watches and stops the processes; the Windows .bat does the same. Variables and their
# defaults: docs/configuration.md. Works with macOS's bash 3.2.
set -eu

ROOT="$(cd "$(dirname "$0")" && pwd)"
VENV="${DREAMLAYER_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # relative to where it is run (the script cd's)
SKIP_INSTALL="${DREAMLAYER_SKIP_INSTALL:-0}"
PYTHON_FOR_VENV="${PYTHON:-python3}"
DEMO=0

for arg in "$@"; do
    case "$arg" in
        --demo) DEMO=1 ;;
        --no-install) SKIP_INSTALL=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "start_dream_layer.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

# 1. The virtualenv: reuse it when it exists, create it otherwise.
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    if ! command -v "$PYTHON_FOR_VENV" >/dev/null 2>&1; then
        echo "ERROR: $PYTHON_FOR_VENV not found. Install Python 3.10 or newer (or set PYTHON=/path/to/python3)." >&2
        exit 1
    fi
    if ! "$PYTHON_FOR_VENV" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "ERROR: $("$PYTHON_FOR_VENV" --version 2>&1) is too old: DreamLayer needs Python 3.10 or newer." >&2
        exit 1
    fi
    echo "Creating the virtualenv $VENV"
    if ! "$PYTHON_FOR_VENV" -m venv "$VENV"; then
        echo "ERROR: could not create $VENV. On Debian/Ubuntu: sudo apt install python3-venv" >&2
        exit 1
    fi
fi

# 2. Requirements (the demo's fake ComfyUI also needs requirements-demo.txt). pip runs only when
#    the requirement files changed since the last successful install into this virtualenv.
if [ "$SKIP_INSTALL" != "1" ]; then
    REQS="$ROOT/requirements.txt"
    if [ "$DEMO" = "1" ]; then REQS="$ROOT/requirements-demo.txt"; fi
    STAMP="$VENV/.dreamlayer-installed"
    SUM="$(cat "$ROOT/requirements.txt" "$REQS" | cksum | tr -s ' ' '-')-$(basename "$REQS")"
    if ! grep -qx -- "$SUM" "$STAMP" 2>/dev/null; then
        echo "Installing $(basename "$REQS") into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check -r "$REQS"
        echo "$SUM" >> "$STAMP"
    fi
fi

# 3. Start, watch and stop the processes (see start_dream_layer.py).
cd "$ROOT"
exec "$PY" "$ROOT/start_dream_layer.py" "$@"
