"""The sweep fixtures (tests/sweep_fixtures.py)."""

from sweep_fixtures import *  # noqa: F403
