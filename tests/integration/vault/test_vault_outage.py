"""OpenBao stopped, restarted sealed, then unsealed, while one issuer keeps running.

Every failure in between must be UNAVAILABLE (clients retry), readiness must say so, and the
issuer must recover on its own, with the same client and no restart of csr-service.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from csr_service.common.errors import UnavailableError
from issuers.vault.issuer import VaultIssuer, create
from tests.integration.vault.conftest import CONTEXT, RestartableOpenBao
from tests.support.issuers import signing_request
from tests.support.waiting import wait_for_async
from tests.testbed.openbao import POLICY

pytestmark = pytest.mark.vault


@pytest.mark.timeout(180)
def test_unavailable_while_down_or_sealed_then_recovers(
    restartable_openbao: RestartableOpenBao, tmp_path: Path
) -> None:
    bao = restartable_openbao
    token = bao.client().auth.token.create(policies=[POLICY], ttl="1h")["auth"]["client_token"]
    (tmp_path / "token").write_text(token)
    values = {
        "vault-address": bao.address,
        "vault-auth": "token",
        "vault-token-file": str(tmp_path / "token"),
        "vault-mount": "pki",
        "vault-role": "spiffe",
        "vault-timeout": timedelta(seconds=2),
    }
    issuer = create(values, CONTEXT)

    async def body(i: VaultIssuer) -> None:
        await i.sign(signing_request())
        assert i.health()[0]

        bao.stop()
        with pytest.raises(UnavailableError) as down:
            await i.sign(signing_request())
        assert "unreachable" in down.value.public
        assert not i.health()[0]

        # Blocking the loop for the restart is fine here; starting from the main thread keeps
        # the server's parent-death signal tied to the test process, not a worker thread.
        bao.start(unseal=False)
        with pytest.raises(UnavailableError) as sealed:
            await i.sign(signing_request())
        assert "sealed" in sealed.value.detail.lower()
        assert token not in sealed.value.detail

        bao.unseal()
        # Readiness recovers by itself (background probe), before any new request.
        await wait_for_async(lambda: i.health()[0], timeout=45, what="readiness to recover after the unseal")
        issued = await i.sign(signing_request())
        assert issued.leaf.not_valid_after_utc > issued.leaf.not_valid_before_utc

    async def main() -> None:
        await issuer.start()
        try:
            await body(issuer)
        finally:
            await issuer.stop()

    asyncio.run(main())
