"""The client-cert authenticator, the ordered --authenticators chain, and their configuration."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from csr_service.common.errors import AuthenticationError, ConfigError
from csr_service.common.request import RequestContext
from csr_service.config import Config, resolve
from csr_service.pipeline.authn.chain import AuthenticatorChain
from csr_service.pipeline.authn.clientcert import ClientCertAuthenticator
from csr_service.pipeline.authn.jwt import JWTAuthenticator, StaticKeySource
from csr_service.plugins.authenticator import AuthenticatorAbilities
from tests.support import pki
from tests.support.clientcerts import BAD_KINDS, ClientCert, bad_client_cert, good_client_cert
from tests.support.pipeline import jwks, make_pipeline, token

ROOT = pki.make_ca("mesh root")
VM = "spiffe://cluster.local/ns/vm/sa/vm-workload"


def _ctx(cert: ClientCert | None = None, **metadata: str) -> RequestContext:
    peer = () if cert is None else tuple(pki.certs_pem(c).encode() for c in (cert.cert, *cert.chain))
    return RequestContext(metadata=metadata, peer_certificates=peer)


def _run(authn: Any, ctx: RequestContext) -> Any:
    return asyncio.run(authn.authenticate(ctx))


def _authn(roots: tuple[Any, ...] = (ROOT.cert,)) -> ClientCertAuthenticator:
    return ClientCertAuthenticator(trust_domain="cluster.local", roots=lambda: roots)


def test_good_certificate_proves_its_identity() -> None:
    caller = _run(_authn(), _ctx(good_client_cert(ROOT)))
    assert (caller.identity.uri, caller.authenticator) == (VM, "client-cert")


def test_certificate_under_an_intermediate_sent_by_the_client() -> None:
    intermediate = pki.make_ca("mesh intermediate", parent=ROOT)
    cert = good_client_cert(intermediate)
    with_chain = ClientCert(cert.cert, cert.key, (intermediate.cert,))
    assert (_run(_authn(), _ctx(with_chain))).identity.uri == VM
    with pytest.raises(AuthenticationError, match="no certificate in the chain or trust bundle issued"):
        _run(_authn(), _ctx(cert))  # without the intermediate there is no path


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_bad_certificate_is_refused(kind: str) -> None:
    with pytest.raises(AuthenticationError) as refused:
        _run(_authn(), _ctx(bad_client_cert(kind, ROOT)))
    assert refused.value.detail.startswith("client certificate refused: ")
    assert "authentication failed" in refused.value.public


def test_root_rotated_out_of_the_bundle_stops_working() -> None:
    roots: list[Any] = [ROOT.cert]
    authn = ClientCertAuthenticator(trust_domain="cluster.local", roots=lambda: tuple(roots))
    cert = good_client_cert(ROOT)
    _run(authn, _ctx(cert))
    roots[:] = [pki.make_ca("the new root").cert]
    with pytest.raises(AuthenticationError, match="no certificate in the chain"):
        _run(authn, _ctx(cert))


def test_accepted_certificate_is_remembered_within_its_validity_and_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from csr_service.pipeline.authn import clientcert

    checks: list[int] = []
    real = clientcert.build_path
    monkeypatch.setattr(clientcert, "build_path", lambda *a, **k: checks.append(1) or real(*a, **k))
    now = [dt.datetime.now(dt.UTC)]
    roots: tuple[Any, ...] = (ROOT.cert,)
    authn = ClientCertAuthenticator(trust_domain="cluster.local", roots=lambda: roots, clock=lambda: now[0])
    cert = good_client_cert(ROOT)
    for _ in range(3):
        assert _run(authn, _ctx(cert)).identity.uri == VM
    assert len(checks) == 1  # the path was verified once
    roots = (ROOT.cert, pki.make_ca("next").cert)  # a new bundle: checked again
    _run(authn, _ctx(cert))
    assert len(checks) == 2
    now[0] = cert.cert.not_valid_after_utc + dt.timedelta(seconds=1)  # remembered, but expired now
    with pytest.raises(AuthenticationError, match="expired"):
        _run(authn, _ctx(cert))


def test_leaf_signed_by_a_non_ca_is_refused() -> None:
    not_a_ca = pki.issue(ROOT, "a workload", client=True)
    leaf_key = pki.new_key()
    leaf = pki.sign_leaf(not_a_ca, leaf_key.public_key(), uris=[VM])
    with pytest.raises(AuthenticationError, match="which is not a CA"):
        _run(_authn(), _ctx(ClientCert(leaf, leaf_key, (not_a_ca.cert,))))


def test_no_certificate_is_not_recognised() -> None:
    assert not _authn().recognizes(_ctx())
    assert _authn().recognizes(_ctx(good_client_cert(ROOT)))
    with pytest.raises(AuthenticationError, match="presented no TLS client certificate"):
        _run(_authn(), _ctx())


def _chain() -> AuthenticatorChain:
    jwt_authn = JWTAuthenticator(StaticKeySource(jwks()), trust_domain="cluster.local")
    return AuthenticatorChain([AuthenticatorAbilities.of(_authn()), AuthenticatorAbilities.of(jwt_authn)])


def test_chain_first_recogniser_decides() -> None:
    chain = _chain()
    assert chain.name == "client-cert,jwt"
    by_cert = _run(chain, _ctx(good_client_cert(ROOT), authorization=f"Bearer {token('default', 'sleep')}"))
    assert (by_cert.authenticator, by_cert.identity.uri) == ("client-cert", VM)
    by_token = _run(chain, _ctx(authorization=f"Bearer {token('default', 'sleep')}"))
    assert (by_token.authenticator, by_token.identity.service_account) == ("jwt", "sleep")
    # A bad certificate decides: the valid token next to it is not tried instead.
    with pytest.raises(AuthenticationError, match="expired"):
        _run(chain, _ctx(bad_client_cert("expired", ROOT), authorization=f"Bearer {token()}"))
    with pytest.raises(AuthenticationError, match="no credential"):
        _run(chain, _ctx())


def test_certificate_for_a_renews_a_only(tmp_path: Path) -> None:
    asyncio.run(_renew_a_only(tmp_path))


async def _renew_a_only(tmp_path: Path) -> None:
    kit = await make_pipeline(tmp_path / "ca")
    key_a = pki.new_key()
    issued = await kit.pipeline.create_certificate(
        pki.csr_pem(key_a, uris=[VM]).decode(),
        3600,
        {},
        RequestContext(metadata={"authorization": f"Bearer {token('vm', 'vm-workload')}"}),
    )
    leaf, *rest = pki.load_certs("".join(issued))
    # The pipeline now takes client certificates (what --authenticators client-cert,jwt does).
    authn = ClientCertAuthenticator(trust_domain="cluster.local", roots=lambda: kit.trust.current.roots)
    kit.pipeline.authenticator = AuthenticatorChain([AuthenticatorAbilities.of(authn)])
    cert_a = RequestContext(metadata={}, peer_certificates=(pki.certs_pem(leaf).encode(),))
    renewed = await kit.pipeline.create_certificate(pki.csr_pem(pki.new_key(), uris=[VM]).decode(), 3600, {}, cert_a)
    assert pki.spiffe_uris(pki.load_certs(renewed[0])[0]) == [VM]
    with pytest.raises(AuthenticationError, match=re.escape(f"caller is {VM}")):
        await kit.pipeline.create_certificate(
            pki.csr_pem(pki.new_key(), uris=["spiffe://cluster.local/ns/vm/sa/someone-else"]).decode(), 3600, {}, cert_a
        )
    del rest


def _config(**flags: Any) -> Config:
    base = {"jwt-jwks-file": "", "dev": False}
    return Config.from_values(resolve({**base, **flags}, env={}))


def test_authenticator_flag_is_a_list_of_one() -> None:
    assert [a.name for a in _config(authenticator="tokenreview").authenticators] == ["tokenreview"]
    first = _config(authenticator="tokenreview").authenticator
    assert first is not None
    assert first.name == "tokenreview"


def test_authenticators_list_in_order() -> None:
    c = _config(authenticators="client-cert,tokenreview", **{"client-cert-grpc-listen": "127.0.0.1:6444"})
    assert [a.name for a in c.authenticators] == ["client-cert", "tokenreview"]
    assert c.server.client_cert_grpc_listen == "127.0.0.1:6444"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"authenticators": "client-cert,jwt"}, "--authenticators client-cert: needs --client-cert-grpc-listen"),
        ({"client-cert-grpc-listen": "127.0.0.1:6444"}, "--client-cert-grpc-listen: add client-cert"),
        ({"authenticators": "jwt,jwt"}, "names one authenticator twice"),
        ({"authenticators": "jwt", "authenticator": "tokenreview"}, "disagree"),
        ({"authenticators": "jwt,nope"}, "unknown authenticator 'nope'"),
    ],
)
def test_authenticator_configuration_errors(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**flags)
