import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _no_listeners_leak():
    """Every test must leave no recorder listening."""
    from tokvis import recording

    yield
    assert not recording._LISTENERS, "a recorder was left open"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A Hugging Face endpoint nobody listens on and an empty hub cache, with no offline flag set:
    what a machine without internet sees (and on a machine with internet, nothing is downloaded)."""
    import socket

    from huggingface_hub import constants

    from tokvis import zoo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(zoo, "_hub_probe", {})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return port
