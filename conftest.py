# Shared fixtures for every package's tests live in one place.
pytest_plugins = ["innova_server.testing.fixtures"]
