"""tests/profiles.py: per-test example counts scale with the Hypothesis profile."""

from hypothesis import settings

from tests.profiles import PROFILE_EXAMPLES, bounded, scaled_examples


def test_bounded_scales_with_the_loaded_profile():
    active = settings.get_current_profile_name()
    try:
        settings.load_profile("ci")
        assert scaled_examples(8) == 8 and bounded(8).max_examples == 8
        settings.load_profile("dev")
        assert bounded(8).max_examples == round(8 * PROFILE_EXAMPLES["dev"] / PROFILE_EXAMPLES["ci"]) > 8
        settings.load_profile("gpu")
        assert bounded(6).max_examples == 10
        assert bounded(8).derandomize is False  # everything but the count comes from the profile
    finally:
        settings.load_profile(active)
    assert settings.get_current_profile_name() == active
