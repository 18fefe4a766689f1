"""Shared fixtures of the fault suite: the engine tests' small image folder."""

from tests.engine.conftest import folder  # noqa: F401 (a fixture, found by name)
