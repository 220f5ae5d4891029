"""The Vault / OpenBao PKI issuer: signs through a PKI role with one shared, renewed client.

``POST <mount>/sign/<role>`` (or ``<mount>/issuer/<ref>/sign/<role>`` to pin an issuer) so the
role's policy applies on top of ours; ``sign-verbatim`` only when the operator asked for it,
because it bypasses the role's name policy.

What Vault does that we must not trust blindly (BACKENDS.md):

- a ``ttl`` above the role's ``max_ttl`` is silently truncated with a warning: we log the
  warnings and read NotAfter from the certificate; one that outlives the request is refused;
- ``certificate``, ``ca_chain`` and ``issuing_ca`` overlap and ``ca_chain`` may hold the root:
  we de-duplicate and order them (the pipeline then verifies against the trust bundle);
- the issued names come from the role's view of the CSR: we check they are exactly the
  requested ones, and that the leaf carries the CSR's key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography import x509

from csr_service.common.errors import CSRServiceError, FailedPreconditionError, InternalError
from csr_service.pki.chain import certifies_key, fingerprint, is_self_signed, order_chain
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import parse_certs
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.vault.settings import IssuerSettings
from issuers.vault_connection.client import VaultClient, response_object, response_warnings
from issuers.vault_connection.settings import ConnectionSettings

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = ["VaultIssuer", "create"]

log = logging.getLogger(__name__)

#: Vault writes NotAfter with one-second precision from its own clock.
NOT_AFTER_SLACK = timedelta(seconds=1)
#: Leaves that sign-verbatim must be told to carry (it defaults to no EKU at all).
VERBATIM_USAGE = {
    "key_usage": ["DigitalSignature", "KeyEncipherment"],
    "ext_key_usage": ["ServerAuth", "ClientAuth"],
}


class _OncePerMessage:
    """Log a Vault warning at WARNING the first time, then at DEBUG: it repeats on every sign."""

    def __init__(self, limit: int = 256) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def first(self, message: str) -> bool:
        # Only called on the event loop (answers are parsed there, on either transport).
        if message in self._seen:
            return False
        if len(self._seen) < self._limit:
            self._seen.add(message)
        return True


class VaultIssuer:
    """Signs through a Vault PKI role.

    Abilities (see the issuer contract): checks_csr_signature, RootsProvider (trust on first
    use: only with --trust-roots-from-issuer), HealthReporter, Lifecycle.
    """

    name = "vault"
    #: Vault and OpenBao refuse a CSR whose signature does not verify, on sign and on
    #: sign-verbatim alike (400 "request signature invalid"; tests/integration/vault proves it
    #: against OpenBao), so the pipeline does not verify it a second time (contract item 7).
    checks_csr_signature = True

    def __init__(self, client: VaultClient, settings: IssuerSettings) -> None:
        self._client = client
        self._settings = settings
        self._warned = _OncePerMessage()
        self._trusted_roots: frozenset[str] = frozenset()
        self._ca_chains: dict[tuple[str, tuple[str, ...]], tuple[x509.Certificate, ...]] = {}

    def __repr__(self) -> str:
        s = self._settings
        return f"VaultIssuer(client={self._client!r}, mount={s.mount!r}, role={s.role!r}, ref={s.issuer_ref!r})"

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Log in to Vault; a bad credential or unreachable Vault raises a csr_service error."""
        if self._settings.sign_verbatim:
            log.warning(
                "--vault-sign-verbatim is on: Vault's role %r does not check names; "
                "csr-service's CSR checks are the only policy",
                self._settings.role,
            )
        await self._client.start()

    async def stop(self) -> None:
        """Stop renewing and release connections (idempotent)."""
        await self._client.stop()

    def health(self) -> tuple[bool, str]:
        """Readiness from the client's last known state (no Vault call)."""
        return self._client.health()

    # --- Issuer ------------------------------------------------------------------------
    def sign_path(self, role: str) -> str:
        """``/v1/<mount>[/issuer/<ref>]/sign[-verbatim]/<role>``."""
        s = self._settings
        prefix = f"/v1/{s.mount}"
        if s.issuer_ref:
            prefix += f"/issuer/{quote(s.issuer_ref, safe='')}"
        verb = "sign-verbatim" if s.sign_verbatim else "sign"
        return f"{prefix}/{verb}/{quote(role, safe='')}"

    def sign_body(self, request: SigningRequest) -> dict[str, Any]:
        """The JSON sent to Vault: the names explicitly, no CN, the clamped TTL in seconds."""
        body: dict[str, Any] = {
            "csr": request.csr_pem.decode("ascii"),
            "common_name": "",
            "exclude_cn_from_sans": True,
            "ttl": f"{max(1, int(request.ttl.total_seconds()))}s",
            "format": "pem",
        }
        if self._settings.sign_verbatim:
            body.update(VERBATIM_USAGE)
        else:
            # With the role's use_csr_sans (default) Vault takes the names from the CSR, which the
            # pipeline has checked; without it, these are what Vault certifies.
            if request.uris:
                body["uri_sans"] = ",".join(request.uris)
            if request.dns_names:
                body["alt_names"] = ",".join(request.dns_names)
            if request.ip_addresses:
                body["ip_sans"] = ",".join(request.ip_addresses)
        return body

    async def sign(self, request: SigningRequest) -> IssuedChain:
        """Sign through the role (workloads) or the serving role (our own certificates)."""
        role = self._settings.role if request.purpose == "workload" else self._settings.serving_role
        path = self.sign_path(role)
        body = self.sign_body(request)

        def rejected(detail: str) -> CSRServiceError:
            return FailedPreconditionError(
                f"the Vault PKI role {role!r} on mount {self._settings.mount!r} refused a certificate "
                "request that csr-service accepted; check the role's allowed_uri_sans, "
                "allowed_domains, allow_ip_sans, key_type and the issuer's validity",
                detail=f"{detail} (request {request.request_id})",
            )

        started = time.perf_counter()
        resp = await self._client.post(path, body, operation=f"sign at {path}", rejected=rejected)
        # Vault starts the lifetime when it signs, somewhere before its answer arrived:
        # bound NotAfter by the arrival time, or a slow round trip would look too long.
        issued = self._parse(resp, request, received=datetime.now(UTC), path=path)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "Vault signed request %s at %s in %.1f ms, serial %x",
                request.request_id,
                path,
                (time.perf_counter() - started) * 1000,
                issued.leaf.serial_number,
            )
        return issued

    def _parse(self, resp: Any, request: SigningRequest, *, received: datetime, path: str) -> IssuedChain:
        for warning in response_warnings(resp):
            level = logging.WARNING if self._warned.first(warning) else logging.DEBUG
            log.log(level, "Vault warning on %s (request %s): %s", path, request.request_id, warning)
        data = response_object(resp, "data", path)
        try:
            issued = parse_certs(str(data.get("certificate") or "").encode(), what=f"{path}: certificate")
        except ValueError as exc:
            raise InternalError(
                "the certificate authority returned an unreadable certificate", detail=str(exc)
            ) from exc
        leaf = issued[0]
        ca_key = (str(data.get("issuing_ca") or ""), tuple(str(c) for c in data.get("ca_chain") or ()))
        # Every leaf of one issuer comes with the same CA certificates: order them (with
        # signature checks) once per distinct set, then only check the name link per leaf;
        # the pipeline verifies each issued chain's signatures against the trust bundle anyway.
        chain = self._ca_chains.get(ca_key) if len(issued) == 1 else None
        if chain is None or leaf.issuer != chain[0].subject:
            chain = self._order(leaf, issued[1:], ca_key, path)
            if len(issued) == 1:
                if len(self._ca_chains) >= 8:  # issuer rotations: keep the cache bounded
                    self._ca_chains.clear()
                self._ca_chains[ca_key] = chain
        _check_leaf(leaf, request, received=received, path=path)
        return IssuedChain(leaf=leaf, chain=chain)

    @staticmethod
    def _order(
        leaf: x509.Certificate, extra: Sequence[x509.Certificate], ca_pems: tuple[str, tuple[str, ...]], path: str
    ) -> tuple[x509.Certificate, ...]:
        pem = "\n".join([*ca_pems[1], ca_pems[0]]).encode()
        try:
            cas = parse_certs(pem, what=f"{path}: ca_chain/issuing_ca") if b"BEGIN" in pem else []
        except ValueError as exc:
            raise InternalError(
                "the certificate authority returned an unreadable certificate", detail=str(exc)
            ) from exc
        chain = order_chain(leaf, [*extra, *cas])
        if not chain:
            raise InternalError(
                "the certificate authority returned no issuing CA",
                detail=f"{path}: no certificate/ca_chain/issuing_ca entry signed leaf {leaf.serial_number:x}",
            )
        return tuple(chain)

    # --- roots ------------------------------------------------------------------------
    async def roots(self) -> Sequence[x509.Certificate]:
        """Vault's roots, only with ``--vault-roots-from-vault``; pinned by fingerprint if given.

        Without that option this refuses loudly rather than returning nothing: an empty trust
        bundle would fail every request later with a much less helpful message.
        """
        s = self._settings
        if not s.roots_from_vault:
            raise FailedPreconditionError(
                "the roots Vault reports are not trusted without --vault-roots-from-vault "
                "(pin them with --vault-root-fingerprints), or give --root-ca-file",
                detail="roots requested from the Vault issuer, but --vault-roots-from-vault is off",
            )
        path = f"{s.mount}/issuer/{quote(s.issuer_ref or 'default', safe='')}/json"
        resp = await self._client.call(VaultClient.read(path), operation=f"read {path}")
        return self._pick_roots(response_object(resp, "data", path), path)

    def _pick_roots(self, data: Mapping[str, Any], path: str) -> list[x509.Certificate]:
        pem = "\n".join([str(data.get("certificate") or ""), *(str(c) for c in data.get("ca_chain") or ())])
        try:
            certs = parse_certs(pem.encode(), what=path)
        except ValueError as exc:
            raise InternalError(
                "the certificate authority returned unreadable CA certificates", detail=str(exc)
            ) from exc
        roots: dict[str, x509.Certificate] = {fingerprint(c): c for c in certs if is_self_signed(c)}
        if not roots:
            raise FailedPreconditionError(
                "Vault does not hold the root of its CA chain; configure --root-ca-file",
                detail=f"{path}: the chain ends at {certs[-1].subject.rfc4514_string()!r} (not self-signed); "
                "configure --root-ca-file",
            )
        pins = self._settings.root_fingerprints
        if pins:
            for fp, cert in list(roots.items()):
                if fp not in pins:
                    log.error(
                        "refusing Vault root %r: fingerprint %s is not in --vault-root-fingerprints",
                        cert.subject.rfc4514_string(),
                        fp,
                    )
                    del roots[fp]
            if not roots:
                raise FailedPreconditionError(
                    "no root from Vault matches --vault-root-fingerprints",
                    detail=f"{path}: roots from Vault do not match the pinned fingerprints",
                )
        if frozenset(roots) != self._trusted_roots:
            self._trusted_roots = frozenset(roots)
            log.warning(
                "trusting root(s) reported by Vault at %s (%s): %s",
                path,
                "pinned by fingerprint" if pins else "trust on first use: pin them with --vault-root-fingerprints",
                ", ".join(f"{c.subject.rfc4514_string()!r} sha256={fp}" for fp, c in roots.items()),
            )
        return list(roots.values())


def _check_leaf(leaf: x509.Certificate, request: SigningRequest, *, received: datetime, path: str) -> None:
    """The contract's MUSTs on what Vault returned: key, exact names, lifetime."""
    if not certifies_key(leaf, request.public_key()):
        raise InternalError("the certificate authority certified a different key", detail=f"{path}: leaf key ≠ CSR key")
    names = subject_alt_names(leaf)
    want = request.sorted_names()
    if names.sorted_names() != want:
        uris, dns, ips = list(names.uris), list(names.dns_names), list(names.ip_addresses)
        # Typically a role with use_csr_sans=true given a CSR without those names: the
        # operator has to fix the role (or the CSR source), so FAILED_PRECONDITION.
        raise FailedPreconditionError(
            f"the Vault PKI role behind {path} certified other names than requested; check its use_csr_sans "
            "and allowed names",
            detail=f"{path}: issued URIs={uris} DNS={dns} IPs={ips}, requested URIs={want[0]} DNS={want[1]} "
            f"IPs={want[2]}; check the role's use_csr_sans / allowed names",
        )
    not_after = leaf.not_valid_after_utc
    limit = received + request.ttl + NOT_AFTER_SLACK
    if not_after > limit:
        raise InternalError(
            "the certificate authority issued a certificate longer-lived than requested",
            detail=f"{path}: NotAfter {not_after:%Y-%m-%dT%H:%M:%SZ} is after the requested "
            f"{limit:%Y-%m-%dT%H:%M:%SZ} (is Vault's clock ahead?)",
        )
    granted = not_after - received
    if granted < request.ttl - timedelta(minutes=1):
        log.debug(
            "Vault shortened the certificate for request %s: asked %ds, got %ds (max_ttl or CA NotAfter)",
            request.request_id,
            request.ttl.total_seconds(),
            granted.total_seconds(),
        )


def create(values: Mapping[str, Any], runtime: Runtime) -> VaultIssuer:
    """Build the Vault issuer from its ``vault-*`` options (see ``options.py``)."""
    del runtime  # the trust domain is enforced by the pipeline and the role, not here
    return VaultIssuer(VaultClient(ConnectionSettings.from_values(values)), IssuerSettings.from_values(values))
