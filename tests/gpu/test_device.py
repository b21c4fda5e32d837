"""Tests that need a CUDA device (skipped with the reason where none is usable)."""
import pytest

import refattn.gpu

status = refattn.gpu.device_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not status.startswith("ok"), reason=status)]


def test_device_is_usable():
    refattn.gpu.require_device()
    found = refattn.gpu.available()
    assert found and found.reason == status[4:], found
