# bullmq-http under gunicorn, as "Running in a container" in the README describes.
# `make image` builds it with Docker or Podman. PYTHON_IMAGE may name any other base
# that holds Python 3.11 or newer with venv at python3 (the tests build on one made
# from Debian's packages).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# The dependencies, in a virtualenv of their own: a layer that a code change keeps.
# Behind a package mirror or a TLS-inspecting proxy, pip takes its config and the
# proxy's CA from build secrets (`make image PIP_CONF=… CA_BUNDLE=…`, README: "In a
# container"), mounted for this step only: neither stays in the image.
FROM ${PYTHON_IMAGE} AS dependencies
# Podman keeps this stage as an untagged image; `make image` removes it by this label.
LABEL bullmq-http.build-stage="dependencies"
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && if [ -f /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
 && python3 -m venv /opt/bullmq-http/venv \
 && /opt/bullmq-http/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      -r /tmp/requirements.txt \
 && /opt/bullmq-http/venv/bin/pip uninstall --yes --quiet pip

FROM ${PYTHON_IMAGE}
ARG VERSION=dev
ARG SOURCE=""
LABEL org.opencontainers.image.title="bullmq-http" \
      org.opencontainers.image.description="BullMQ job progress and logs over HTTP" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT"

COPY --from=dependencies /opt/bullmq-http/venv /opt/bullmq-http/venv
WORKDIR /opt/bullmq-http
# The service's modules and the page's files; .dockerignore lets in nothing else.
COPY . .
RUN python3 -m compileall -q /opt/bullmq-http/*.py

# Listening on every address of the container's own network, on 8080; every other
# setting comes from the environment, as the README's table says. The metrics live in
# a fresh directory under /tmp (run with --read-only and a tmpfs there).
ENV PATH=/opt/bullmq-http/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BIND=0.0.0.0:8080
USER 10001:10001
EXPOSE 8080

# gunicorn stops gracefully on SIGTERM: requests in flight finish (a body must arrive
# within REQUEST_TIMEOUT, 10 s, of its first byte), streams end after a second, and
# their clients resume elsewhere with Last-Event-ID.
STOPSIGNAL SIGTERM
# /healthz, asked wherever BIND (or PORT) says the service listens, a unix socket too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "bullmq_http.healthcheck"]
CMD ["python3", "serve.py"]
