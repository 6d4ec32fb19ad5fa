"""The sweep fixtures (tests/sweep_fixtures.py): tiny specs, throwaway databases, sweeps in
subprocesses."""

from sweep_fixtures import *  # noqa: F403
