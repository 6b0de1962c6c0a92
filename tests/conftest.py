"""The fast lane: `make test-fast` runs `pytest -m "not slow"`. Tests that use a fixture which trains or serves a
whole model end to end are slow wherever they are; others carry `@pytest.mark.slow` themselves."""

import pytest

# Fixtures that run train.py (main job, reference run) or start the Gradio app in a browser.
SLOW_FIXTURES = {"main_job", "reference_run", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _feature_store_in_a_temporary_folder(tmp_path_factory):
    """Tests never write to the real feature store (~/.cache/enecg_hf/features): `ENECG_HF_CACHE` points at a
    temporary folder for the session, inherited by the train.py and `python -m enecg_hf.features` subprocesses."""
    import os

    previous = os.environ.get("ENECG_HF_CACHE")
    os.environ["ENECG_HF_CACHE"] = str(tmp_path_factory.mktemp("enecg_hf_cache"))
    yield
    if previous is None:
        os.environ.pop("ENECG_HF_CACHE", None)
    else:
        os.environ["ENECG_HF_CACHE"] = previous
