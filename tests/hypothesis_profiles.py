"""Hypothesis profiles: a fixed, derandomised one by default (CI, ``make test``), a wider one on demand.

``HYPOTHESIS_PROFILE=explore python -m pytest tests/config/test_config_fuzz.py`` draws anew on every run and
``EXPLORE_FACTOR`` times as many examples per test; a failure it finds is kept in the test as an explicit
``@example``, so the default profile checks it from then on.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "HYPOTHESIS_PROFILE"
DEFAULT_PROFILE = "ci"
EXPLORE_FACTOR = 20

settings.register_profile(
    "ci",
    derandomize=True,  # the same draws on every run: the verdict never depends on the draw
    database=None,  # nothing remembered between runs either
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", derandomize=False, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)
settings.load_profile(PROFILE)


def examples(count: int) -> int:
    """A test's number of examples under the loaded profile: ``count``, or ``EXPLORE_FACTOR`` times it."""
    return count * EXPLORE_FACTOR if PROFILE == "explore" else count
