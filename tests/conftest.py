import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _no_listeners_leak():
    """Every test must leave no recorder listening."""
    from tokvis import recording

    yield
    assert not recording._LISTENERS, "a recorder was left open"
