"""The request pipeline, read top to bottom: authenticate, check, rate-limit, validate, clamp, sign, verify.

Transport-independent: the gRPC servicer converts the call into these arguments and the
result (or a csr_service error) back. Benchmarks call it directly for the in-process ceiling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from csr_service.common.errors import CSRServiceError, FailedPreconditionError, InvalidRequestError
from csr_service.common.request import RequestContext
from csr_service.infra.metrics import count_sign_error, observe_sign
from csr_service.pipeline.clusterid import check_cluster_id
from csr_service.pipeline.csr import rule_signature, validate_csr
from csr_service.pipeline.duration import decide_ttl
from csr_service.pipeline.impersonation import IMPERSONATION_KEY, ImpersonationPolicy, NoImpersonation
from csr_service.pipeline.ratelimit import IdentityRateLimiter
from csr_service.pipeline.verify import ChainVerifier, response_chain
from csr_service.plugins.authenticator import Authenticator
from csr_service.plugins.issuer import IssuedChain, Issuer, IssuerAbilities, SigningRequest
from csr_service.trust.bundle import TrustBundle

__all__ = ["CertificatePipeline", "IssuerSlot", "PipelineSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    trust_domain: str
    #: Accepted ``clusterid`` values: a set, or the live ClusterSet with remote clusters.
    cluster_ids: Collection[str]
    max_duration: timedelta
    default_duration: timedelta


class IssuerSlot:
    """The active issuer, with its abilities resolved once when it is set.

    Swapping it (runtime configuration) leaves in-flight requests on the issuer they started
    with, because each request reads the slot once.
    """

    def __init__(self, issuer: Issuer) -> None:
        self.active = IssuerAbilities.of(issuer)

    @property
    def current(self) -> Issuer:
        """The active issuer itself."""
        return self.active.issuer

    @current.setter
    def current(self, issuer: Issuer) -> None:
        self.active = IssuerAbilities.of(issuer)


class CertificatePipeline:
    """Turns one CreateCertificate request into a response chain or a csr_service error."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        issuers: IssuerSlot,
        trust: TrustBundle,
        settings: PipelineSettings,
        impersonation: ImpersonationPolicy | None = None,
        rate_limit: IdentityRateLimiter | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.issuers = issuers
        self.trust = trust
        self.settings = settings
        self.impersonation = impersonation or NoImpersonation()
        self.rate_limit = rate_limit
        self._verifier = ChainVerifier()

    async def create_certificate(
        self, csr: str, validity_seconds: int, metadata: Mapping[str, Any], ctx: RequestContext
    ) -> list[str]:
        """Run the pipeline; returns ``[leaf, intermediates..., root bundle]``."""
        started = time.perf_counter()
        # First: a cluster we do not serve costs no TokenReview.
        check_cluster_id(ctx, self.settings.cluster_ids)
        caller = await self.authenticator.authenticate(ctx)
        identities = caller.identities
        requested = metadata.get(IMPERSONATION_KEY)
        if requested:
            if not isinstance(requested, str):
                raise InvalidRequestError(f"{IMPERSONATION_KEY} must be a string")
            identities = (await self.impersonation.authorize(caller, requested),)
        if self.rate_limit is not None:  # before the CSR is parsed: a refusal costs nothing more
            for identity in identities:
                self.rate_limit.check(identity)
        active = self.issuers.active  # read once: a swap mid-request does not affect this one
        issuer = active.issuer
        # The proof of possession is verified once: here, or by a backend that always does it.
        backend_checks_signature = active.checks_csr_signature
        # 0.05-0.1 ms (with the signature): inline (see csr_service.infra.cpu)
        validated = validate_csr(csr, identities, check_signature=not backend_checks_signature)

        now = datetime.now(UTC)
        ca_not_after = active.signing_ca_not_after()
        ttl = decide_ttl(
            validity_seconds,
            default=self.settings.default_duration,
            maximum=self.settings.max_duration,
            now=now,
            ca_not_after=ca_not_after,
        )
        if ttl <= timedelta(0):
            raise FailedPreconditionError("the signing CA has expired", detail=f"signing CA NotAfter {ca_not_after}")
        request = SigningRequest(
            csr=validated.csr,
            csr_pem=validated.pem,
            ttl=ttl,
            uris=(validated.uri,),
            request_id=ctx.request_id,
            csr_public_key=validated.public_key,
        )
        signing = _sign_checked(issuer, request) if backend_checks_signature else issuer.sign(request)
        issued = await observe_sign(active.name, signing)  # timed and counted per issuer
        trust = self.trust.current
        try:
            # A fresh clock reading: a remote backend may take a while and stamp its own "now".
            leaf_pem, intermediates = self._verifier.verify(
                issued,
                request,
                trust,
                now=datetime.now(UTC),
                issuer=issuer,
                signed_in_process=active.signs_in_process,
            )
        except CSRServiceError as exc:
            # What the issuer returned is unusable (wrong chain, names, usages): its failure.
            count_sign_error(active.name, exc)
            raise
        # DEBUG, not INFO: at 1,000+ issuances/s a line each floods operators' logs and
        # costs CPU on the hot path; counts live in the metrics, failures log at WARNING/ERROR.
        if log.isEnabledFor(logging.DEBUG):  # the arguments cost more than the disabled call
            log.debug(
                "issued certificate identity=%s ttl=%ds not_after=%s issuer=%s took_ms=%.1f",
                validated.uri,
                int(ttl.total_seconds()),
                issued.leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                active.name,
                (time.perf_counter() - started) * 1000,
            )
        return response_chain(leaf_pem, intermediates, trust)


async def _sign_checked(issuer: Issuer, request: SigningRequest) -> IssuedChain:
    """``issuer.sign`` for an issuer whose backend checks the CSR's signature (contract item 7).

    A refusal may be a forged CSR or the backend's configuration: a CSR whose signature does
    not verify is the caller's fault, so it becomes INVALID_ARGUMENT (and counts as Istio's
    CSR_ERROR), not the FAILED_PRECONDITION about the backend the issuer raised.
    """
    try:
        return await issuer.sign(request)
    except FailedPreconditionError as refusal:
        try:
            rule_signature(request.csr, request.public_key())
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                exc.public, detail=f"{exc.detail}; the backend refused it too: {refusal.detail}"
            ) from refusal
        raise
