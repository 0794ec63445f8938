"""The provider contract for vast: the real ``vastai`` SDK against the emulator over HTTP."""

from __future__ import annotations

import pytest

from choline_provisioner.providers import Provider
from choline_provisioner.providers.vast import VastProvider

from ..providers.contract import ProviderContract


class TestVastContract(ProviderContract):
    spec = "1x3090"
    unknown_instance_id = "999999"

    @pytest.fixture
    def provider(self, vast_provider: VastProvider) -> Provider:
        return vast_provider
