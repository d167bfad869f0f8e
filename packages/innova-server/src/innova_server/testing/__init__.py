"""Test helpers for Innova and its plugins.

- `registered(plugin)`: make a plugin object visible for the length of a block.
- `innova_server.testing.fixtures`: pytest fixtures (a real MongoDB-wire
  server, settings, a live server on loopback); enable them with
  `pytest_plugins = ["innova_server.testing.fixtures"]` in a conftest.py.
"""

from __future__ import annotations

from innova_server.plugins import registered

__all__ = ["registered"]
