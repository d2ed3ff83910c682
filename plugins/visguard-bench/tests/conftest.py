"""Shared fixtures (from :mod:`visguard_testing.fixtures`: tiny checkpoints, one torch thread, images)."""

from visguard_testing.fixtures import *  # noqa: F403 - pytest finds the fixtures by name
