"""The fast lane: `make test-fast` runs `pytest -m "not slow"`. Tests that use a fixture which trains or serves a
whole model end to end are slow wherever they are; others carry `@pytest.mark.slow` themselves."""

import pytest

# Fixtures that run train.py (main job, reference run) or start the Gradio app in a browser.
SLOW_FIXTURES = {"main_job", "reference_run", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
