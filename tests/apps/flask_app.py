"""A Flask (WSGI) app that reports what the proxy told it and exercises streaming.

Runs on 127.0.0.1:$CDSW_APP_PORT (CML's advice); werkzeug's ProxyFix trusts one proxy's
X-Forwarded-For/Proto/Host, so ``request.url`` is the address the browser used."""

import hashlib
import json
import os
import time

from flask import Flask, Response, request
from markupsafe import escape
from werkzeug.middleware.proxy_fix import ProxyFix

app = Flask(__name__)
app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]


@app.get("/")
def index() -> Response:
    user = request.headers.get("Remote-User")
    greeting = escape(user or "anonymous")
    page = f"<!doctype html><title>Flask on Kiln</title><h1 id='hello'>Hello, {greeting}</h1>"
    if request.args.get("format") == "html":
        return Response(page, mimetype="text/html")
    raw = {k: v for k, v in request.headers.items()}
    body = {
        "user": user,
        "name": request.environ.get("HTTP_REMOTE_NAME"),
        "email": request.headers.get("Remote-Email"),
        "url": request.url,
        "remote_addr": request.remote_addr,
        "cookies": dict(request.cookies),
        "headers": raw,
        "pid": os.getpid(),
        "version": os.environ.get("APP_VERSION", "1"),
    }
    return Response(json.dumps(body), mimetype="application/json")


@app.get("/stream")
def stream() -> Response:
    """``mb`` MiB of zeros in 1 MiB chunks, made as they are read (never held whole)."""
    megabytes = int(request.args.get("mb", "1"))
    chunk = b"\0" * (1024 * 1024)

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(megabytes):
            yield chunk

    return Response(chunks(), mimetype="application/octet-stream")


@app.get("/events")
def events() -> Response:
    """Server-sent events, one every ``gap`` seconds: each must arrive on its own."""
    gap = float(request.args.get("gap", "0.5"))

    def produce():  # type: ignore[no-untyped-def]
        for number in range(3):
            yield f"data: event {number} at {time.time():.3f}\n\n"
            time.sleep(gap)

    return Response(produce(), mimetype="text/event-stream")


@app.post("/upload")
def upload() -> Response:
    digest, size = hashlib.sha256(), 0
    while True:
        block = request.stream.read(1024 * 1024)
        if not block:
            break
        digest.update(block)
        size += len(block)
    return Response(
        json.dumps({"size": size, "sha256": digest.hexdigest()}), mimetype="application/json"
    )


@app.get("/cookies")
def cookies() -> Response:
    response = Response("cookies set")
    response.set_cookie("app_session", "mine", httponly=True)
    response.set_cookie("tossed", "sibling", domain=request.args.get("domain", "kiln.localhost"))
    response.headers.add("Set-Cookie", "__Host-kiln_session=forged; Path=/; Secure")
    response.headers.add("Set-Cookie", "kiln_access=forged; Path=/")
    return response


@app.get("/slow")
def slow() -> Response:
    time.sleep(float(request.args.get("seconds", "2")))
    return Response("slow done")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["CDSW_APP_PORT"]), threaded=True)
