"""Build an in-process pipeline with a local CA and a JWT key, for unit tests and benchmarks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwt import JWTAuthenticator, StaticKeySource
from csr_service.pipeline.handler import CertificatePipeline, IssuerSlot, PipelineSettings
from csr_service.plugins.issuer import Issuer
from csr_service.trust.bundle import TrustBundle
from issuers.local.issuer import DirectorySource, LocalCAIssuer
from tests.support.certs import write_ca_dir

JWT_KEY = ec.generate_private_key(ec.SECP256R1())


def jwks() -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(JWT_KEY.public_key()))
    jwk.update(kid="k1", alg="ES256")
    return {"keys": [jwk]}


def token(ns: str = "default", sa: str = "sleep", **over: Any) -> str:
    now = int(time.time())
    claims = {
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 600,
        **over,
    }
    return jwt.encode(claims, JWT_KEY, algorithm="ES256", headers={"kid": "k1"})


def ctx(tok: str | None = None, **md: str) -> RequestContext:
    metadata = dict(md)
    metadata["authorization"] = f"Bearer {tok or token()}"
    return RequestContext(metadata=metadata)


@dataclass
class PipelineKit:
    pipeline: CertificatePipeline
    issuer: LocalCAIssuer
    trust: TrustBundle
    ca_dir: Path


async def make_pipeline(
    ca_dir: Path,
    *,
    intermediate: bool = False,
    issuer: Issuer | None = None,
    max_duration: timedelta = timedelta(hours=1),
) -> PipelineKit:
    """A pipeline over a fresh local CA in ``ca_dir`` (optionally with another issuer slotted in)."""
    write_ca_dir(ca_dir, intermediate=intermediate)
    local = LocalCAIssuer(DirectorySource(str(ca_dir)), reload_interval=timedelta(0))
    await local.start()
    trust = TrustBundle(await local.roots())
    pipeline = CertificatePipeline(
        authenticator=JWTAuthenticator(StaticKeySource(jwks()), trust_domain="cluster.local"),
        issuers=IssuerSlot(issuer or local),
        trust=trust,
        settings=PipelineSettings(
            trust_domain="cluster.local",
            cluster_ids=frozenset({"Kubernetes"}),
            max_duration=max_duration,
            default_duration=max_duration,
        ),
    )
    return PipelineKit(pipeline=pipeline, issuer=local, trust=trust, ca_dir=ca_dir)
