"""The benchmarks are not run by the suite (they measure), but they must keep working: a moved
function once broke P3 unnoticed. These run their cheap parts on tiny inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def test_every_benchmark_module_imports():
    code = "import run, backends, floor_client, workload, upload_cost, service, fake_server, http_hop"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("what", ["service", "pillow", "base64"])
def test_upload_cost_runs(tmp_path, what):
    sys.path.insert(0, str(BENCH))
    try:
        from workload import write_inputs
    finally:
        sys.path.remove(str(BENCH))
    image, mask = write_inputs(tmp_path, 64)
    out = subprocess.run([sys.executable, str(BENCH / "upload_cost.py"), "--what", what, "--repeat", "1",
                          str(image), str(mask)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["what"] == what and len(result["seconds"]) == 1


def test_http_hop_answers_and_stops_when_its_pipe_closes():
    """The floor comparison's HTTP hop: the service's web server, a view that only reads the body."""
    import requests

    proc = subprocess.Popen([sys.executable, str(BENCH / "http_hop.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        body = b'{"image": "' + b"A" * 5000 + b'"}'
        resp = requests.post(url + "/api/img2img", data=body, headers={"Content-Type": "application/json"},
                             timeout=30)
        assert resp.status_code == 200 and resp.json() == {"status": "success", "bytes": len(body)}
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_the_redis_latency_is_per_pair_and_leaves_out_each_prompts_execution(capsys):
    """backends.py's verdict: each Redis request against the in-process one sent next to it, each
    less its own execution in the fake (which no path adds, and which spreads at 512²)."""
    sys.path.insert(0, str(BENCH))
    try:
        import backends
    finally:
        sys.path.remove(str(BENCH))
    # client ms, execution ms: the Redis requests add 2 ms beyond their (longer) executions
    local = [(20.0, 10.0), (30.0, 20.0), (25.0, 15.0)]
    queued = [(40.0, 28.0), (33.0, 21.0), (30.0, 18.0)]
    assert backends.print_latency([("64²", local, queued)]) is True
    assert "2.00 ms" in capsys.readouterr().out
    slower = [(q + 1.5, x) for q, x in queued]  # 3.5 ms added: over the 3 ms target
    assert backends.print_latency([("64²", local, slower)]) is False
