"""The harness that starts real servers for the tests, the benchmark and `make run`;
never part of the service, nor of its image."""
