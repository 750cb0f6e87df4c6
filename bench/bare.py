"""The stack's ceiling: a bare WSGI callable that reads the body and answers OK."""


def app(environ, start_response):
    """Read the request body, answer 200 OK."""
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"OK"]
