"""The fake ComfyUI in a process of its own, for the benchmark (not a test).

    python benchmarks/fake_server.py --root DIR --step-delay 0.02 --history-delay 0.005

Prints one JSON line {"url", "input_dir", "output_dir", "pid", ...} once it listens, then runs until its standard input
is closed (the benchmark holds the pipe) or it gets SIGTERM. Running it apart from the service and
from the benchmark's clients keeps the three from sharing one GIL, as ComfyUI, the service and the
browser do not share one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dreamlayer.comfyui.fake import FakeComfyUI  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--step-delay", type=float, required=True, help="seconds per sampler step")
    parser.add_argument("--history-delay", type=float, default=None,
                        help="gap between execution_success and the /history write (default: the fake's)")
    args = parser.parse_args(argv)

    fake = FakeComfyUI(args.root)
    fake.step_delay = args.step_delay
    if args.history_delay is not None:
        fake.history_delay = args.history_delay
    fake.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"url": fake.url, "input_dir": str(fake.input_dir), "output_dir": str(fake.output_dir), "pid": os.getpid(),
                      "step_delay": fake.step_delay, "history_delay": fake.history_delay}), flush=True)

    def wait_stdin():
        sys.stdin.read()  # returns when the benchmark closes the pipe (or dies)
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    try:
        stop.wait()
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
