"""Loads the conformance plugin for `pytest conformance`."""

from conformance.plugin import *  # noqa: F403 - pytest hooks and fixtures
