"""The HTTP hop alone, for the floor comparison of benchmarks/run.py: a Flask app whose one view
reads the request's body and answers a small JSON object, served by waitress with the service's
own settings (img2img.app.server_options) and malloc set as the service sets it (allocator.py),
in a process of its own.

Its client time is what putting any Flask service on waitress between a client and ComfyUI costs
a request before the service does any work (sending the body, waitress's parsing and hand-over
to a worker thread, Flask's dispatch, the answer): a part of the service − floor difference that
no change inside the service can remove.

    python benchmarks/http_hop.py    # prints {"url": ...} once it listens; runs until stdin closes
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Flask, jsonify, request  # noqa: E402
from waitress.server import create_server  # noqa: E402

from dreamlayer import allocator  # noqa: E402
from dreamlayer.config.env import Environment  # noqa: E402
from dreamlayer.config.img2img import Config  # noqa: E402
from dreamlayer.img2img.app import server_options  # noqa: E402


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/api/img2img")
    def img2img():
        return jsonify(status="success", bytes=len(request.get_data()))

    return app


def main() -> int:
    allocator.tune_for_requests(Environment().snapshot())
    options = server_options(Config.from_env(Environment({})))
    options.update(host="127.0.0.1", port=0)
    server = create_server(create_app(), **options)
    threading.Thread(target=server.run, name="waitress", daemon=True).start()
    print(json.dumps({"url": f"http://127.0.0.1:{server.effective_port}"}), flush=True)
    sys.stdin.read()  # returns when the benchmark closes the pipe (or dies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
