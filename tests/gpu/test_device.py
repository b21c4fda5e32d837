"""Tests that need a CUDA device. No kernel ships yet; this checks the device path."""
import pytest

import refattn.gpu

status = refattn.gpu.device_status()
pytestmark = pytest.mark.skipif(not status.startswith("ok"), reason=status)


def test_device_is_usable():
    refattn.gpu.require_device()
