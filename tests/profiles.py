"""Hypothesis profiles, and `bounded`: the one way a property test sets its own example count.

Profiles (registered by tests/conftest.py, chosen with `pytest --hypothesis-profile=NAME`):
* ci (the default): derandomized, so a commit passes or fails the same way on every machine; bounded so
  the whole CPU suite stays well under 20 minutes on 2 cores (the Triton interpreter is slow).
* dev: fresh examples every run, PROFILE_EXAMPLES["dev"] / PROFILE_EXAMPLES["ci"] times as many; how new
  failures are hunted.
* gpu: fresh examples at real speed; real sizes take seconds per example.

A test whose examples are expensive asks for fewer with `@bounded(n)`: n examples under ci, and n scaled
by the active profile's ratio to ci under any other, so `--hypothesis-profile=dev` or `gpu` deepens every
property, not only those that kept the profile's default.
"""

from hypothesis import HealthCheck, settings

PROFILE_EXAMPLES = {"ci": 12, "dev": 40, "gpu": 20}
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def register_profiles() -> None:
    settings.register_profile("ci", max_examples=PROFILE_EXAMPLES["ci"], derandomize=True, **_COMMON)
    settings.register_profile("dev", max_examples=PROFILE_EXAMPLES["dev"], derandomize=False, **_COMMON)
    settings.register_profile("gpu", max_examples=PROFILE_EXAMPLES["gpu"], derandomize=False, **_COMMON)


def scaled_examples(n: int) -> int:
    """n examples under ci, scaled by the active profile's max_examples relative to ci's (read when the
    test module is imported, after pytest has loaded --hypothesis-profile)."""
    return max(1, round(n * settings.default.max_examples / PROFILE_EXAMPLES["ci"]))


def bounded(max_examples: int, **overrides) -> settings:
    """Settings for a property with `max_examples` examples under ci (scaled under other profiles).
    Function-scoped fixtures are allowed (e.g. monkeypatch, poison_empty): they are set once for all of
    the test's examples, which is what these tests want."""
    return settings(max_examples=scaled_examples(max_examples),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large], **overrides)
