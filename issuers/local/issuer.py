"""The local CA issuer: signs Istio-shaped certificates with a CA keypair it holds.

The CA comes from a :class:`MaterialSource` (a directory today; a Kubernetes Secret or Vault
KV plug in the same way). It is checked at load, re-read periodically, and a bad new CA is
refused: we keep signing with the last good one and report the problem through
:meth:`LocalCAIssuer.health` and the log, because a typo in a Secret must not stop a mesh
from renewing its certificates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from csr_service.common.errors import ConfigError, FailedPreconditionError
from csr_service.common.lifecycle import BackgroundTask
from csr_service.infra.cpu import run_cpu
from csr_service.pki.certs import CLOCK_SKEW, LeafSpec, build_leaf
from csr_service.plugins.issuer import IssuedChain, RootsListener, SigningRequest
from issuers.local.material import CAMaterial, CAMaterialError, load_ca_dir

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = ["DirectorySource", "LocalCAIssuer", "MaterialSource", "create"]

log = logging.getLogger(__name__)


class MaterialSource(Protocol):
    """Where the CA comes from. ``load`` raises CAMaterialError (or OSError) when unusable."""

    def describe(self) -> str: ...

    async def load(self) -> CAMaterial: ...


class DirectorySource:
    """CA files in a directory (a mounted Secret, istiod's cacerts, dev mode's state dir)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> str:
        return f"directory {self.directory}"

    async def load(self) -> CAMaterial:
        return await asyncio.to_thread(load_ca_dir, self.directory)


def _is_slow_key(material: CAMaterial) -> bool:
    """RSA signing above 2048 bits takes milliseconds: worth a thread hop."""
    return isinstance(material.key, rsa.RSAPrivateKey) and material.key.key_size > 2048


class LocalCAIssuer:
    """Signs with a local CA keypair.

    Abilities (see the issuer contract): signs_in_process, RootsProvider, RootsWatcher,
    SigningCAInfo, HealthReporter, Lifecycle. Its roots come from the operator's own files (or
    KV secret), so they are configuration, not trust on first use.
    """

    name = "local"
    #: Contract item 8: it signs with ``material.key``, which the CA loader refuses unless it
    #: matches ``material.cert`` (load_ca_pem), and returns that ``material.cert`` as chain[0],
    #: both from the one CAMaterial object a request reads once.
    signs_in_process = True
    roots_are_configuration = True

    def __init__(self, source: MaterialSource, *, reload_interval: timedelta, initial: CAMaterial | None = None):
        self._source = source
        self._material: CAMaterial | None = initial
        self._last_error: str | None = None
        self._listeners: list[RootsListener] = []
        # reload_interval 0 switches the re-reading off.
        self._reloader = (
            BackgroundTask("local-ca-reload", self.reload, every=reload_interval.total_seconds(), logger=log)
            if reload_interval > timedelta(0)
            else None
        )

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load the CA (fail if unusable) and start watching for changes."""
        if self._material is None:
            try:
                self._material = await self._source.load()
            except (CAMaterialError, OSError) as exc:
                raise FailedPreconditionError("the local CA cannot be loaded", detail=str(exc)) from exc
            log.info("local CA loaded: %s", self._material.describe())
        if self._reloader is not None:
            self._reloader.start()

    async def stop(self) -> None:
        if self._reloader is not None:
            await self._reloader.stop()
        close = getattr(self._source, "aclose", None)  # sources holding clients (Vault KV)
        if close is not None:
            await close()

    async def reload(self) -> bool:
        """Re-read the CA; adopt it if it is good and different. Returns True on a change."""
        try:
            new = await self._source.load()
        except (CAMaterialError, OSError) as exc:
            if str(exc) != self._last_error:
                log.error("local CA reload failed, keeping the last good CA: %s", exc)
            self._last_error = str(exc)
            return False
        self._last_error = None
        if self._material is not None and new.digest == self._material.digest:
            return False
        self._material = new
        log.info("local CA changed: %s", new.describe())
        for listener in list(self._listeners):
            try:
                listener(new.roots)
            except Exception:  # a broken listener must not stop CA rotation
                log.exception("CA change listener failed")
        return True

    def add_roots_listener(self, listener: RootsListener) -> None:
        """Call ``listener(roots)`` after every adopted CA change (contract: RootsWatcher)."""
        self._listeners.append(listener)

    # --- Issuer ------------------------------------------------------------------------
    @property
    def material(self) -> CAMaterial:
        if self._material is None:
            raise FailedPreconditionError("the local CA is not loaded", detail="LocalCAIssuer used before start()")
        return self._material

    async def sign(self, request: SigningRequest) -> IssuedChain:
        material = self.material
        if _is_slow_key(material):
            return await run_cpu(self._sign_sync, material, request)
        return self._sign_sync(material, request)  # ~0.1 ms: inline (see csr_service.infra.cpu)

    @staticmethod
    def _sign_sync(material: CAMaterial, request: SigningRequest) -> IssuedChain:
        now = datetime.now(UTC)
        if now >= material.not_after:
            raise FailedPreconditionError(
                "the signing CA has expired", detail=f"{material.describe()} expired; rotate the CA"
            )
        spec = LeafSpec(
            not_before=now - CLOCK_SKEW,
            # Never past the CA: a leaf outliving its issuer fails verification at the peer.
            not_after=min(now + request.ttl, material.not_after),
            uris=request.uris,
            dns_names=request.dns_names,
            ip_addresses=request.ip_addresses,
            server_auth=not request.usages or "server auth" in request.usages,
            client_auth=not request.usages or "client auth" in request.usages,
        )
        leaf = build_leaf(request.public_key(), spec, material.cert, material.key)  # type: ignore[arg-type]
        return IssuedChain(leaf=leaf, chain=(material.cert, *material.intermediates))

    # --- optional abilities ------------------------------------------------------------------
    async def roots(self) -> Sequence[x509.Certificate]:
        return self.material.roots

    def signing_ca_not_after(self) -> datetime | None:
        return self._material.not_after if self._material else None

    def health(self) -> tuple[bool, str]:
        if self._material is None:
            return False, f"local CA not loaded from {self._source.describe()}"
        now = datetime.now(UTC)
        if now >= self._material.not_after:
            return False, f"local CA expired at {self._material.not_after:%Y-%m-%dT%H:%M:%SZ}"
        msg = f"local CA valid until {self._material.not_after:%Y-%m-%dT%H:%M:%SZ}"
        if self._last_error:
            msg += f"; last reload failed (still using the last good CA): {self._last_error}"
        return True, msg


def create(values: Mapping[str, Any], runtime: Runtime) -> LocalCAIssuer:
    """Build the local issuer from its options (see ``options.py``)."""
    directory = values.get("local-ca-dir") or ""
    interval: timedelta = values.get("local-ca-reload-interval", timedelta(seconds=10))
    if values.get("local-ca-vault-kv-path"):
        if directory:
            raise ConfigError("--local-ca-dir/--local-ca-vault-kv-path: give one CA source, not both")
        from issuers.local.vault_kv import create_source  # imports hvac only when used

        return LocalCAIssuer(create_source(values), reload_interval=interval)
    if not directory:
        raise ConfigError("--local-ca-dir: required with --issuer local (or use --dev)")
    return LocalCAIssuer(DirectorySource(directory), reload_interval=interval)
