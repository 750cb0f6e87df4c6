"""openapi.yaml: served at /openapi.json, and describing exactly the routes the app has."""

import re

import yaml

from app import OPENAPI

METHODS = {"get", "post", "put", "patch", "delete"}


def registered_routes(app) -> set[tuple[str, str]]:
    """Return (method, OpenAPI path) for every route the app answers."""
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule.rule)
        routes |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def described_routes(spec) -> set[tuple[str, str]]:
    """Return (method, path) for every operation the description has."""
    return {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in METHODS
    }


def test_the_description_and_the_app_have_the_same_routes(app):
    spec = yaml.safe_load(OPENAPI.read_text())
    assert registered_routes(app) == described_routes(spec)
    assert len(described_routes(spec)) == 19


def test_every_operation_documents_its_error_answers(app):
    spec = yaml.safe_load(OPENAPI.read_text())
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in METHODS or not path.startswith("/queues/"):
                continue
            answers = set(operation["responses"])
            # Minting a watch token asks nothing of Redis, and reads no body; the watch
            # page and its files, the same for every job, neither, and take no token.
            # Every route answers 404 to a job id it cannot route (one holding a line
            # break).
            minting = path.endswith("/events/token")
            page = path.endswith(("/watch", "/{name}"))
            assert {"200", "400", "404"} <= answers, (method, path)
            assert ("401" in answers) != page, (method, path)
            assert ("503" in answers) != (minting or page), (method, path)
            assert ("413" in answers) == (method == "post" and not minting), (method, path)


def test_the_description_is_served_as_json(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    spec = response.get_json()
    assert spec["openapi"] == "3.1.0"
    assert spec["servers"] == [{"url": "/"}]
    assert described_routes(spec) == described_routes(yaml.safe_load(OPENAPI.read_text()))


def test_the_served_server_url_is_the_trusted_mount_prefix(make_app):
    client = make_app(TRUSTED_PROXIES=1).test_client()
    spec = client.get("/openapi.json", headers={"X-Forwarded-Prefix": "/bullmq"}).get_json()
    assert spec["servers"] == [{"url": "/bullmq"}]


def test_an_untrusted_prefix_is_ignored(client):
    spec = client.get("/openapi.json", headers={"X-Forwarded-Prefix": "/evil"}).get_json()
    assert spec["servers"] == [{"url": "/"}]
