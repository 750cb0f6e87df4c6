"""Start the service: `python serve.py`, which runs gunicorn with gunicorn.conf.py.

It does what `gunicorn -c gunicorn.conf.py` does, but for one thing: gunicorn reads
WEB_CONCURRENCY itself as it is imported, before any configuration file, and stops
with a traceback of its own at a value that is not a whole number. Here the server's
settings are read first, by settings.py as gunicorn.conf.py reads them, so every bad
setting stops start-up with one line. Arguments go on to gunicorn, after the config.
"""

from __future__ import annotations

import os
import sys

from bullmq_http.settings import ConfigError, server_settings


def main() -> None:
    """Check the server's settings, then become gunicorn (the same process)."""
    try:
        server_settings(os.environ)
    except ConfigError as error:
        sys.exit(str(error))
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *sys.argv[1:]]
    os.execv(sys.executable, gunicorn)  # noqa: S606 (a fixed argument list)


if __name__ == "__main__":
    main()
