import pytest

from tests.k8s.manifests import OVERLAYS, render


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def resources(overlay: str) -> list[dict]:
    """The resources of one overlay, rendered by kustomize."""
    return render(overlay)
