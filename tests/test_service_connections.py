"""Connections to a real `infinite-talk serve` process (tiny preset) whose open-file limit is 256: hundreds of idle,
stalled and trickling sockets leave /health answering and the running job completing; a busy port stops `serve`
with a clear message and a non-zero code before it takes any job; SIGTERM waits a bounded time for an upload."""

from __future__ import annotations

import json
import os
import re
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from infinite_talk.service.app import ACCEPT_BURST  # noqa: E402
from infinite_talk.service.store import JobStore  # noqa: E402
from infinite_talk.testing.service import wait_until_healthy  # noqa: E402

EXAMPLES = Path(__file__).parent / "data" / "examples"
OPEN_FILES = 256  # the server's limit: the 300 idle connections exhausted it
IDLE_S, BODY_S, SHUTDOWN_S = 2, 3, 1
JOB = {"steps": 2, "text_scale": 1.0, "audio_scale": 1.0, "frame_num": 21, "motion_frames": 5, "max_seconds": 3.0,
       "seed": 5}
IDLE_SOCKETS, STALLED_SOCKETS, TRICKLING_SOCKETS = 150, 150, 2
WAIT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(data: Path, port: int, log: Path, cache: Path, *extra: str) -> subprocess.Popen:
    def low_file_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))

    env = {**os.environ, "INFINITE_TALK_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("INFINITE_TALK_TOKEN", None)
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "infinite_talk.cli", "serve", "--preset", "tiny", "--model-precision", "fp32",
             "--vae-precision", "fp32", "--data-dir", str(data), "--port", str(port), "--idle-timeout", str(IDLE_S),
             "--body-timeout", str(BODY_S), "--shutdown-timeout", str(SHUTDOWN_S), *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=low_file_limit)


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("serve")
    port = _free_port()
    proc = _serve(root / "data", port, root / "serve.log", cache)
    url = f"http://127.0.0.1:{port}"
    try:
        why = wait_until_healthy(url, [proc], WAIT_S)
        if why:
            pytest.fail(f"server did not start ({why}):\n{(root / 'serve.log').read_text()[-3000:]}")
        yield {"proc": proc, "url": url, "port": port, "data": root / "data", "log": root / "serve.log"}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _submit(url: str) -> dict:
    files = {"reference": ("portrait.png", (EXAMPLES / "portrait.png").read_bytes()),
             "audio": ("speech.wav", (EXAMPLES / "speech_en.wav").read_bytes())}
    answer = httpx.post(url + "/jobs", files=files, data={"options": json.dumps(JOB)}, timeout=120)
    assert answer.status_code == 201, answer.text
    return answer.json()


def _stalled_upload(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 b"Content-Length: 1000000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"audio\"; "
                 b"filename=\"a.wav\"\r\n\r\nRIFF")
    return sock


def _answers(sockets: list[socket.socket], timeout: float) -> list[bytes | None]:
    """What the server sent on each socket until it closed it (None: still open when `timeout` passed)."""
    got: dict[socket.socket, bytes] = {s: b"" for s in sockets}
    open_ = set(sockets)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.5)
        for s in ready:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data
            else:
                open_.discard(s)
    return [None if s in open_ else got[s] for s in sockets]


def _server_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_hundreds_of_idle_stalled_and_trickling_sockets(server):
    url, port, proc = server["url"], server["port"], server["proc"]
    job = _submit(url)
    rebound = httpx.get(f"{url}/jobs/{job['id']}", headers={"Host": f"attacker.example:{port}"}, timeout=30)
    assert rebound.status_code == 403 and "answers only requests addressed to" in rebound.json()["error"]
    cross_site = httpx.post(f"{url}/jobs/{job['id']}/cancel", headers={"Origin": "https://attacker.example"},
                            timeout=30)
    assert cross_site.status_code == 403 and "cross-origin request refused" in cross_site.json()["error"]
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    idle, stalled = [], []
    trickling = [_stalled_upload(port) for _ in range(TRICKLING_SOCKETS)]
    stop = threading.Event()

    def trickle():  # a byte a second: never a pause as long as the body timeout, always too slow
        while not stop.wait(1.0):
            for s in trickling:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        peak = 0
        for i in range(IDLE_SOCKETS + STALLED_SOCKETS):
            if i % 2:
                stalled.append(_stalled_upload(port))
            else:
                idle.append(socket.create_connection(("127.0.0.1", port)))
            if i % 25 == 0:
                peak = max(peak, _server_sockets(proc.pid))
        health = None
        deadline = time.monotonic() + 60
        while health is None and time.monotonic() < deadline:  # every socket above is still open on this side
            peak = max(peak, _server_sockets(proc.pid))
            try:
                answer = httpx.get(url + "/health", timeout=5)
                if answer.status_code == 200:
                    health = answer.json()
            except httpx.TransportError:
                pass
        assert health is not None and health["status"] == "ok", health
        assert health["workers"][0]["state"] in ("running a job", "idle")

        idle_answers = _answers(idle, IDLE_S + 30)
        stalled_answers = _answers(stalled + trickling, BODY_S + 30)
    finally:
        stop.set()
        for s in idle + stalled + trickling:
            s.close()
    assert all(a is not None for a in idle_answers), "idle connections left open"
    assert all(a is not None for a in stalled_answers), "stalled uploads left open"
    timed_out = [a for a in stalled_answers if a.startswith(b"HTTP/1.1 408")]
    busy = [a for a in stalled_answers + idle_answers if a.startswith(b"HTTP/1.1 503")]
    assert len(timed_out) + len(busy) + sum(a == b"" for a in stalled_answers) == len(stalled_answers)
    assert timed_out and all(b"the request body stalled" in a or b"arrives too slowly" in a for a in timed_out)
    assert any(b"arrives too slowly" in a for a in stalled_answers[-TRICKLING_SOCKETS:] if a)

    done = httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json()
    while done["state"] in ("queued", "running"):
        assert time.monotonic() < deadline + WAIT_S
        time.sleep(0.2)
        done = httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json()
    assert done["state"] == "completed" and done["frames"] == 75 and done["runs"] == 1, done
    summary = re.compile(r"connections: (\d+) idle closed at the limit of \d+, (\d+) refused \(all busy\)")
    while not summary.search(server["log"].read_text()):  # one summary line, not one line per connection
        assert time.monotonic() < deadline + WAIT_S
        time.sleep(0.5)
    log = server["log"].read_text()
    assert "Too many open files" not in log and "Traceback" not in log
    limit = int(re.search(r"at most (\d+) connections \(open-file limit 256\)", log).group(1))
    # + a burst accepted before the cap sees it, a burst still closing, the listener and the loop's own
    assert peak <= limit + 2 * ACCEPT_BURST + 8 < OPEN_FILES, (peak, limit)
    folder = server["data"] / "jobs" / job["id"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["output.mp4"] == modes["output.json"] == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    print(f"\n{len(idle)} idle + {len(stalled)} stalled + {len(trickling)} trickling sockets against an open-file "
          f"limit of {OPEN_FILES}: at most {limit} connections, {peak} server sockets at the peak; "
          f"{len(timed_out)} answered 408, {len(busy)} answered 503, every idle one closed; job completed")


def test_sigterm_waits_a_bounded_time_for_an_upload(server):
    upload = _stalled_upload(server["port"])  # a request in flight that would never end by itself
    try:
        time.sleep(0.5)
        server["proc"].send_signal(signal.SIGTERM)
        assert server["proc"].wait(WAIT_S) == 0
    finally:
        upload.close()
    log = server["log"].read_text()
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in log
    assert log.rstrip().endswith("stopped")


def test_a_busy_port_stops_serve_before_it_takes_a_job(tmp_path, cache):
    store = JobStore(tmp_path / "data")
    job = store.submit(EXAMPLES / "portrait.png", EXAMPLES / "speech_en.wav", options=JOB)
    store.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(tmp_path / "data", port, tmp_path / "serve.log", cache)
        try:
            code = proc.wait(WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "serve.log").read_text()
    assert code == 2, log
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another program uses this port" in log
    assert "Traceback" not in log
    after = JobStore(tmp_path / "data").get(job.id)
    assert after.state == "queued" and after.runs == 0


def test_the_protocol_closes_idle_evicts_at_the_cap_and_drops_clients_that_stop_reading():
    """The connection rules on uvicorn's protocol, without sockets: an idle connection is evicted at the cap before one
    with a request in progress; a client that reads nothing of its response is disconnected after the write
    timeout; a request in progress is never closed for idleness."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from infinite_talk.service.connections import ConnectionLimits, bounded_protocol

    class Transport(asyncio.Transport):
        """Enough of asyncio's socket transport: closing it tells the protocol, in the next loop turn."""

        def __init__(self):
            super().__init__()
            self.closed, self.sent, self.protocol = False, b"", None

        def get_extra_info(self, name, default=None):
            return default

        def is_closing(self):
            return self.closed

        def close(self):
            if not self.closed:
                self.closed = True
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

        def write(self, data):
            self.sent += data

    async def scenario():
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def endless(scope, receive, send):  # a response that does not come until the test ends
            await release.wait()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        protocol = bounded_protocol(ConnectionLimits(max_connections=3, idle_timeout_s=0.3, write_timeout_s=0.3))
        config, state = uvicorn.Config(endless, log_level="warning"), ServerState()

        def connect(request: bytes | None = None):
            conn, transport = protocol(config=config, server_state=state, app_state={}, _loop=loop), Transport()
            transport.protocol = conn
            conn.connection_made(transport)
            if request:
                conn.data_received(request)
            return conn, transport

        get = b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        reading, t_reading = connect(get)
        stuck, t_stuck = connect(get)
        idle, t_idle = connect()
        await asyncio.sleep(0)
        newest, t_newest = connect()  # over the cap: the idle one goes, not those with a request in progress
        assert t_idle.closed and not (t_reading.closed or t_stuck.closed or t_newest.closed)
        stuck.pause_writing()  # its client reads nothing: the transport's buffer stays full
        await asyncio.sleep(0.6)
        assert t_stuck.closed and not t_reading.closed  # a request in progress is not idle
        assert t_newest.closed  # it never sent a request
        full, t_full = connect(get)
        also, t_also = connect(get)
        await asyncio.sleep(0)
        refused, t_refused = connect()  # every connection has a request in progress: 503, closed
        assert t_refused.closed and t_refused.sent.startswith(b"HTTP/1.1 503 Service Unavailable")
        assert not (t_full.closed or t_also.closed or t_reading.closed)
        release.set()
        await asyncio.gather(*state.tasks)

    asyncio.run(scenario())
