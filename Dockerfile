# bullmq-http under gunicorn, as "Running in a container" in the README describes.
# `make image` builds it with Docker or Podman. PYTHON_IMAGE may name any other base
# that holds Python 3.11 or newer with venv at python3 (the tests build on one made
# from Debian's packages).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# The dependencies, in a virtualenv of their own: a layer that a code change keeps.
FROM ${PYTHON_IMAGE} AS dependencies
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/bullmq-http/venv \
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["python3", "serve.py"]
