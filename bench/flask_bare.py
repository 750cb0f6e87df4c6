"""The stack's ceiling with Flask: a route that reads the body and answers OK."""

from flask import Flask, request

app = Flask(__name__)


@app.route("/", methods=["POST"])
@app.route("/healthz")
def ok() -> tuple[str, dict[str, str]]:
    """Read the request body, answer 200 OK."""
    request.get_data()
    return "OK", {"Content-Type": "text/plain"}
