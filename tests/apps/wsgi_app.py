"""The benchmark's trivial WSGI app: a few bytes, and a large download made as it is read."""


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ.get("PATH_INFO", "/")
    if path == "/big":
        size = int(environ.get("QUERY_STRING", "").partition("=")[2] or 1024)
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(size * 1024 * 1024)),
            ],
        )
        chunk = b"\0" * (1024 * 1024)
        return (chunk for _ in range(size))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
