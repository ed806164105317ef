"""Kiln's model server: what runs inside a model replica.

It serves one Python function of a project over HTTP with CML's contract::

    python3 kiln_model_server.py --file predict.py --function predict --port 8080

This module imports **only the standard library** and nothing of Kiln: the builder copies
this one file into the model's image (``/opt/kiln/serving/kiln_model_server.py``) and the
image's ``Cmd`` starts it, so a built model also runs on its own under podman or as a pod
(``tests/unit/test_model_server_stdlib.py`` keeps it that way).

- It listens at once, then imports the user's file **once** (working directory unchanged —
  ``/home/cdsw`` in a replica —, the file's directory first on ``sys.path``) and looks up the
  function. ``GET /_kiln/ready`` answers 503 until that succeeded and 200 after, so nothing
  is sent to a replica that is still importing. An import error, or a function that is not
  there, prints the traceback (the replica's log) and exits with status 1: the deployment
  fails with the reason in its log.
- ``POST /model`` takes ``{"request": <JSON>}`` (an ``accessKey`` beside it is ignored: the
  router checked it) and calls ``function(request)``. It answers CML's shape,
  ``{"success": true, "response": <result>, "ReplicaID": "<replica>"}``. A function that
  raises answers ``{"success": false, "response": {"message", "type"}}`` with 500, or with
  the exception's own ``status_code`` when that is a 4xx (how a function says the *input* is
  wrong); its traceback goes to the log. NumPy-like results (``tolist``/``item``) become JSON;
  anything else that is not JSON (also NaN) is a 500 naming the type.
- Bad requests are refused before the function runs: no or a bad ``Content-Length`` (411,
  400), a body over ``--max-body-bytes`` (413), not UTF-8 JSON, not an object, no
  ``request``, or nested too deeply (400).
- Concurrency: ``--threads T`` calls at once per process (a semaphore around the call;
  each kept-alive connection has its own thread). ``--processes P`` > 1 imports once, then
  forks P workers that share the listening socket; a worker that dies (a function that
  killed its process) is replaced from the warm parent and the death is logged.
- Metrics: what the model's code tracks with ``cml.metrics_v1`` during a call goes to the
  router beside the answer, when the router asks (see *metrics of a call* below); the CML
  library sits beside this file in an image.
- Drain: on SIGTERM it answers ``/_kiln/ready`` with 503, stops accepting connections, lets
  calls in flight finish (at most ``--drain-seconds``) and exits 0.
- KServe V1, Open Inference V2 and MLflow's ``/invocations`` reach the same function through
  ``model_protocols`` (standard library only too, copied beside this file), which says how
  each protocol's request becomes the function's argument.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _sibling(name: str) -> Any:
    """The module ``name``.py beside this file, loaded by its path: run as a script (in the
    image, maybe with ``python -I``, which keeps this directory off ``sys.path``) there is no
    package to import it from. It is registered as ``kiln_<name>``, never under its bare name,
    so a user's own module of that name imports as theirs."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kiln_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is missing beside the model server")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is made
    spec.loader.exec_module(module)
    return module


try:  # imported as kiln.serving.model_server (the router, the tests)
    from . import model_protocols as protocols
except ImportError:  # run as a script: the image's /opt/kiln/serving/, or a test's replica
    protocols = _sibling("model_protocols")

SERVER = "kiln-model-server"
MAX_BODY_BYTES = 5 * 1024 * 1024  # CML's limit
READ_SECONDS = 60.0  # a client that sends nothing for this long is disconnected
DRAIN_SECONDS = 30.0
MAX_DEPTH = protocols.MAX_DEPTH
IMPORT_FAILED = 1
DEFAULT_MODEL_NAME = "model"  # the name the protocols' paths use when none was given


class ServerState:
    """What every request handler of one process shares."""

    def __init__(
        self,
        replica_id: str,
        threads: int,
        max_body_bytes: int,
        model_name: str = DEFAULT_MODEL_NAME,
    ) -> None:
        self.replica_id = replica_id
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.function: Callable[[Any], Any] | None = None
        self.draining = False
        self.slots = threading.BoundedSemaphore(threads)
        self._inflight = 0
        self._lock = threading.Lock()
        self.idle = threading.Condition(self._lock)

    @property
    def ready(self) -> bool:
        return self.function is not None and not self.draining

    @property
    def inflight(self) -> int:
        return self._inflight

    def begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def end(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self.idle.notify_all()

    def wait_idle(self, seconds: float) -> bool:
        with self._lock:
            return self.idle.wait_for(lambda: self._inflight == 0, timeout=seconds)


class CallFailed(protocols.ProtocolError):
    """The call cannot be answered with the function's result: ``status``, a message and
    the name of the function's exception (``kind``), if it raised one."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(status, message)
        self.kind = kind


def load_function(file: str, function: str) -> Callable[[Any], Any]:
    """Import ``file`` as a module (once) and return its callable ``function``. Raises what
    the import raises, or ``LookupError`` naming what is missing."""
    path = Path(file)
    if not path.is_file():
        raise LookupError(f"model file {file!r} does not exist (in {Path.cwd()})")
    name = path.stem if path.stem.isidentifier() else "kiln_model"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LookupError(f"model file {file!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    spec.loader.exec_module(module)
    found = getattr(module, function, None)
    if found is None:
        raise LookupError(f"model file {file!r} has no function {function!r}")
    if not callable(found):
        raise LookupError(f"{function!r} in {file!r} is a {type(found).__name__}, not a function")
    return found


encode = protocols.encode


def parse_request(body: bytes) -> Any:
    """The ``request`` member of a CML body, or ``CallFailed(400)`` saying what is wrong."""
    try:
        decoded = protocols.json_object(body, '{"request": ...}')
    except protocols.ProtocolError as refused:
        raise CallFailed(refused.status, refused.message) from None
    if "request" not in decoded:
        raise CallFailed(400, 'the body has no "request" member')
    return decoded["request"]


too_deep = protocols.too_deep


def invoke(state: ServerState, request: Any) -> Any:
    """The function's result for ``request`` (in one of the process's call slots), or
    ``CallFailed``: 503 while loading, the exception's own 4xx ``status_code``, else 500."""
    function = state.function
    if function is None:
        raise CallFailed(503, "the model is still loading")
    with state.slots:
        try:
            return function(request)
        except Exception as exc:
            traceback.print_exc()
            status = getattr(exc, "status_code", None)
            if not (isinstance(status, int) and 400 <= status <= 499):
                status = 500
            raise CallFailed(status, str(exc) or type(exc).__name__, type(exc).__name__) from None


def call(state: ServerState, request: Any) -> bytes:
    """Run the function on ``request`` and encode CML's answer; ``CallFailed`` otherwise."""
    result = invoke(state, request)
    try:
        return encode({"success": True, "response": result, "ReplicaID": state.replica_id})
    except (TypeError, ValueError, RecursionError) as exc:
        detail = "NaN or infinity" if isinstance(exc, ValueError) else str(exc)
        raise CallFailed(500, f"the function's result is not JSON: {detail}") from None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER
    sys_version = ""
    timeout = READ_SECONDS
    state: ServerState  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per call would drown the function's own output

    def _answer(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        body = encode(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close or self.state.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, failed: CallFailed, close: bool = False) -> None:
        response: dict[str, Any] = {"message": failed.message}
        if failed.kind:
            response["type"] = failed.kind
        payload = {"success": False, "response": response, "ReplicaID": self.state.replica_id}
        self._answer(failed.status, payload, close)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_kiln/live":
            self._answer(200, {"live": True})
        elif path == "/_kiln/ready":
            state = self.state
            status = 200 if state.ready else 503
            phase = "draining" if state.draining else ("ready" if state.ready else "loading")
            self._answer(status, {"ready": state.ready, "state": phase, "inflight": state.inflight})
        elif protocols.handles(path):
            self._answer_protocol("GET", path, b"")
        else:
            self._refuse(CallFailed(404, f"no such path: {path[:200]}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/model" and protocols.handles(path):
            self._protocol_call(path)
            return
        if path != "/model":
            self._drain_body_or_close()
            self._refuse(
                CallFailed(404, f"no such path: {path[:200]}"), close=self.close_connection
            )
            return
        try:
            body = self._read_body()
        except CallFailed as failed:
            self._refuse(failed, close=True)  # the rest of the body was not read
            return
        self.state.begin()
        try:
            self._answer_call(body)
        finally:
            self.state.end()

    def _answer_call(self, body: bytes) -> None:
        open_call_metrics()
        try:
            answer = call(self.state, parse_request(body))
        except CallFailed as failed:
            take_call_metrics()  # a failed call's metrics are not kept
            self._refuse(failed)
            return
        self._answer_with_metrics(200, answer, take_call_metrics())

    def _answer_with_metrics(
        self, status: int, answer: bytes, metrics: bytes, allow: str = ""
    ) -> None:
        """A call's answer, after its tracked metrics when the router asks for them."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if self.headers.get(METRICS_REQUEST_HEADER) == "1":  # the router asks for them
            self.send_header(METRICS_LENGTH_HEADER, str(len(metrics)))
            answer = metrics + answer
        self.send_header("Content-Length", str(len(answer)))
        if allow:
            self.send_header("Allow", allow)
        if self.state.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def _protocol_call(self, path: str) -> None:
        """KServe V1, Open Inference V2 or MLflow: the body read as for ``/model``."""
        try:
            body = self._read_body()
        except CallFailed as failed:
            refusal = protocols.error_payload(path, failed.status, failed.message)
            self._answer(failed.status, refusal, close=True)  # the rest was not read
            return
        self.state.begin()
        try:
            self._answer_protocol("POST", path, body)
        finally:
            self.state.end()

    def _answer_protocol(self, method: str, path: str, body: bytes) -> None:
        state = self.state
        request = protocols.Request(
            method=method,
            path=path,
            content_type=self.headers.get("Content-Type", ""),
            body=body,
            model=self.headers.get(protocols.MODEL_NAME_HEADER) or state.model_name,
            ready=state.ready,
            json_length=self.headers.get("Inference-Header-Content-Length"),
        )
        open_call_metrics()  # a batch's predictions (one call each) are the request's
        answer = protocols.answer(request, lambda value: invoke(state, value))
        metrics = take_call_metrics()
        if answer.status != 200:
            metrics = b""  # a failed call's metrics are not kept
        self._answer_with_metrics(answer.status, answer.body, metrics, answer.allow)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise CallFailed(411, "send the body with a Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise CallFailed(411, "send the body with a Content-Length")
        if not length_text.isdigit():
            raise CallFailed(400, "Content-Length is not a number")
        length = int(length_text)
        if length > self.state.max_body_bytes:
            raise CallFailed(
                413, f"the body is {length} bytes; the limit is {self.state.max_body_bytes}"
            )
        body = self.rfile.read(length)
        if len(body) < length:
            raise CallFailed(400, "the body ended before its Content-Length")
        return body

    def _drain_body_or_close(self) -> None:
        length_text = self.headers.get("Content-Length", "0")
        if length_text.isdigit() and int(length_text) <= self.state.max_body_bytes:
            self.rfile.read(int(length_text))
        else:
            self.close_connection = True


# ---- metrics of a call (``cml.metrics_v1`` in the model's code) ------------------------------
# The CML library (``cml._core``, copied beside this file) finds the module ``METRICS_HOOK`` in
# ``sys.modules`` and hands it the metrics of each call of a ``@cml_model(metrics=True)``
# function; the handler sends them to the router before the answer, when the router asks
# (``X-Kiln-Metrics: 1``): ``X-Kiln-Metrics-Length: N`` and the body is N bytes of a JSON
# array of records, then the answer. Direct callers (the image run alone) never see them.

METRICS_HOOK = "kiln_replica_calls"
METRICS_REQUEST_HEADER = "X-Kiln-Metrics"
METRICS_LENGTH_HEADER = "X-Kiln-Metrics-Length"
# The library drops a prediction's metrics over 64 KB of JSON; a call's records (each with its
# UUID and times) get this much in all, over it the rest are dropped.
CALL_METRICS_BYTES = 80 * 1024
MAX_RECORDS_PER_CALL = 16
_calls = threading.local()


def open_call_metrics() -> None:
    """A call begins on this thread: what the library records now belongs to it."""
    _calls.records = []
    _calls.size = 0


def take_call_metrics() -> bytes:
    """The metrics of this thread's call as a JSON array (``b""`` when none), and close it."""
    records: list[bytes] = getattr(_calls, "records", None) or []
    _calls.records = None
    return b"[" + b",".join(records) + b"]" if records else b""


def _call_active() -> bool:
    return getattr(_calls, "records", None) is not None


def _record_call_metrics(
    prediction_uuid: str, start_ms: int, end_ms: int, metrics: dict[str, Any]
) -> None:
    records: list[bytes] | None = getattr(_calls, "records", None)
    if records is None:
        return
    try:
        record = encode(
            {"uuid": prediction_uuid, "start_ms": start_ms, "end_ms": end_ms, "metrics": metrics}
        )
    except (TypeError, ValueError, RecursionError) as exc:
        log(f"metrics of prediction {prediction_uuid} dropped: not JSON ({exc})")
        return
    if len(records) >= MAX_RECORDS_PER_CALL or _calls.size + len(record) > CALL_METRICS_BYTES:
        log(
            f"metrics of prediction {prediction_uuid} dropped: a call's metrics may be at most "
            f"{CALL_METRICS_BYTES} bytes of JSON in {MAX_RECORDS_PER_CALL} predictions"
        )
        return
    records.append(record)
    _calls.size += len(record)


def library_on_path() -> None:
    """The CML library sits beside this file in an image (``/opt/kiln/serving/cml``); Python
    puts a script's directory first on ``sys.path``, except in isolated or safe-path mode
    (``-I``, ``PYTHONSAFEPATH``): then it is put there here."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "cml")) and here not in sys.path:
        sys.path.insert(0, here)


def install_metrics_hook() -> None:
    """Register the module the CML library looks for (once per process)."""
    hook = types.ModuleType(METRICS_HOOK, "Kiln's model server: metrics of the current call.")
    hook.active = _call_active  # type: ignore[attr-defined]
    hook.record = _record_call_metrics  # type: ignore[attr-defined]
    sys.modules[METRICS_HOOK] = hook


def make_server(sock: socket.socket, state: ServerState) -> ThreadingHTTPServer:
    """An HTTP server over an already listening socket."""
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    return server


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def log(message: str) -> None:
    print(f"[kiln model server] {message}", file=sys.stderr, flush=True)


def import_or_exit(state: ServerState, file: str, function: str) -> None:
    log(f"importing {file}")
    started = time.monotonic()
    try:
        state.function = load_function(file, function)
    except BaseException as exc:
        if isinstance(exc, LookupError):
            log(f"cannot serve: {exc}")
        else:
            traceback.print_exc()
            log(f"cannot serve: importing {file} failed ({type(exc).__name__}: {exc})")
        sys.stderr.flush()
        os._exit(IMPORT_FAILED)
    log(f"{file}: {function} ready after {time.monotonic() - started:.2f} s")


def drain(server: ThreadingHTTPServer, state: ServerState, seconds: float) -> None:
    state.draining = True
    server.shutdown()  # no new connections are accepted
    if not state.wait_idle(seconds):
        log(f"{state.inflight} calls still running after {seconds:.0f} s; exiting anyway")
    server.server_close()


def serve_threads(sock: socket.socket, state: ServerState, args: argparse.Namespace) -> int:
    """One process: listen, import, serve until SIGTERM, drain."""
    server = make_server(sock, state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
    import_or_exit(state, args.file, args.function)  # in the main thread: signals work there
    log(f"serving on port {sock.getsockname()[1]} with {args.threads} threads")
    stop.wait()
    log("stopping: finishing the calls in flight")
    drain(server, state, args.drain_seconds)
    return 0


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def serve_processes(sock: socket.socket, state: ServerState, args: argparse.Namespace) -> int:
    """Import once, then fork ``--processes`` workers on the shared socket; replace a worker
    that dies; on SIGTERM pass it on and wait for all of them."""
    import_or_exit(state, args.file, args.function)
    sock.setblocking(False)  # workers race for each connection; the losers go back to wait
    stopping = False
    workers: dict[int, int] = {}  # pid -> slot

    def fork(slot: int) -> None:
        # A SIGTERM reaching a new worker before it set its own handler would run this
        # process's ``on_term`` in it and be lost (the worker then never stops): the signals
        # stay blocked across the fork, and the worker unblocks them once its handler is set.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(_worker(sock, state, args, slot))
            workers[pid] = slot
            if stopping:  # a SIGTERM came after the loop looked: this worker stops too
                os.kill(pid, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    for slot in range(args.processes):
        fork(slot)
    log(
        f"serving on port {sock.getsockname()[1]} with {args.processes} processes "
        f"of {args.threads} threads"
    )
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = workers.pop(pid, -1)
        if slot < 0 or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log(f"worker {slot} {how}; starting another")
        fork(slot)
    return 0


def _worker(sock: socket.socket, parent: ServerState, args: argparse.Namespace, slot: int) -> int:
    state = ServerState(
        f"{parent.replica_id}/{slot}", args.threads, parent.max_body_bytes, parent.model_name
    )
    state.function = parent.function
    try:
        server = make_server(sock, state)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked since the fork
        threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
        stop.wait()
        drain(server, state, args.drain_seconds)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="kiln_model_server",
        description="Serve one Python function of a project over HTTP with CML's contract "
        '(POST /model {"request": ...}).',
    )
    parser.add_argument("--file", required=True, help="the Python file, relative to the cwd")
    parser.add_argument("--function", required=True, help="the function to call")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")  # noqa: S104
    parser.add_argument(
        "--port", type=int, default=int(env.get("KILN_MODEL_PORT", "8080")), help="TCP port"
    )
    parser.add_argument("--threads", type=int, default=4, help="calls at once per process")
    parser.add_argument("--processes", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body"
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="on SIGTERM, how long calls in flight may take to finish",
    )
    parser.add_argument(
        "--replica-id",
        default=env.get("KILN_REPLICA_ID") or socket.gethostname(),
        help="the ReplicaID in answers (default: $KILN_REPLICA_ID, else the host name)",
    )
    parser.add_argument(
        "--model-name",
        default=env.get("KILN_MODEL") or DEFAULT_MODEL_NAME,
        help="the {name} in the KServe and Open Inference paths "
        f"(default: $KILN_MODEL, else {DEFAULT_MODEL_NAME!r})",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= 256 or not 1 <= args.processes <= 64:
        parser.error("--threads must be 1-256 and --processes 1-64")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be 1-65535")
    if args.max_body_bytes < 1 or not math.isfinite(args.drain_seconds):
        parser.error("--max-body-bytes must be positive and --drain-seconds finite")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    library_on_path()
    install_metrics_hook()
    state = ServerState(args.replica_id, args.threads, args.max_body_bytes, args.model_name)
    sock = listen(args.host, args.port)
    if args.processes > 1:
        return serve_processes(sock, state, args)
    return serve_threads(sock, state, args)


if __name__ == "__main__":
    sys.exit(main())
