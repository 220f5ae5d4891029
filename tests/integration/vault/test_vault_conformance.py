"""The Vault issuer passes the shared issuer conformance suite against a real OpenBao.

Three variants: the root-only mount with the SPIFFE-only role (token auth), the
root + intermediate mount (approle auth), and a role that also allows DNS/IP names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509

from issuers.vault.issuer import create
from tests.conformance.issuer_suite import IssuerConformance, IssuerFactory
from tests.integration.vault.conftest import CONTEXT, VaultEnv
from tests.testbed.process import free_port

pytestmark = pytest.mark.vault


class _VaultConformance(IssuerConformance):
    mount = "pki"
    role = "spiffe"
    auth = "token"

    @pytest.fixture
    def issuer_factory(self, vault_env: VaultEnv, tmp_path: Path) -> IssuerFactory:
        values = vault_env.issuer_values(tmp_path, auth=self.auth, mount=self.mount, role=self.role)
        return lambda: create(values, CONTEXT)

    @pytest.fixture
    def trust_roots(self, vault_env: VaultEnv) -> Sequence[x509.Certificate]:
        return [x509.load_pem_x509_certificate(vault_env.bao.mounts[self.mount].root_pem.encode())]

    @pytest.fixture
    def unusable_issuer_factory(self, vault_env: VaultEnv, tmp_path: Path) -> IssuerFactory:
        values = vault_env.issuer_values(tmp_path, mount=self.mount, role=self.role)
        values["vault-address"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return lambda: create(values, CONTEXT)


class TestRootMountSpiffeRoleToken(_VaultConformance):
    supports_dns_names = False


class TestIntermediateMountAppRole(_VaultConformance):
    supports_dns_names = False
    mount = "pki_int"
    auth = "approle"


class TestMeshRoleWithDnsAndIp(_VaultConformance):
    role = "mesh"
