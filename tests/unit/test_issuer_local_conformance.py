"""The local CA issuer passes the shared issuer conformance suite (both layouts, intermediates)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from issuers.local.issuer import DirectorySource, LocalCAIssuer
from tests.conformance.issuer_suite import IssuerConformance, IssuerFactory
from tests.support.certs import write_ca_dir

VARIANTS = {
    "cacerts-ec-root": dict(layout="cacerts", key_kind="ec256"),
    "cacerts-rsa-intermediate": dict(layout="cacerts", key_kind="rsa", intermediate=True),
    "tls-ec384-intermediate": dict(layout="tls", key_kind="ec384", intermediate=True),
}


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def ca_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, x509.Certificate]:
    d = tmp_path_factory.mktemp(request.param)
    _, _, root = write_ca_dir(d, **VARIANTS[request.param])  # type: ignore[arg-type]
    return d, root


class TestLocalIssuerConformance(IssuerConformance):
    @pytest.fixture
    def issuer_factory(self, ca_dir: tuple[Path, x509.Certificate]) -> IssuerFactory:
        return lambda: LocalCAIssuer(DirectorySource(str(ca_dir[0])), reload_interval=timedelta(0))

    @pytest.fixture
    def trust_roots(self, ca_dir: tuple[Path, x509.Certificate]) -> Sequence[x509.Certificate]:
        return [ca_dir[1]]

    @pytest.fixture
    def unusable_issuer_factory(self, tmp_path: Path) -> IssuerFactory:
        return lambda: LocalCAIssuer(DirectorySource(str(tmp_path / "missing")), reload_interval=timedelta(0))
