"""Dev mode: a zero-config local CA and a token minter, kept in a state directory.

First start generates an ECDSA P-256 root CA (signing is ~3x cheaper than RSA 2048) and an
RSA 2048 JWT signing key (RS256, like the service-account key of kubeadm, kind and the managed
clouds, so dev-mode figures include the token check real clusters cost); later starts reuse
them, and a state directory from an older release with an EC key keeps signing ES256. Keys
are 0600, the directory 0700.
``dev-token`` mints tokens shaped like Kubernetes projected service-account tokens, signed
by that key, which the dev server's JWT authenticator accepts.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from csr_service.infra.fsutil import write_atomic
from csr_service.pki.certs import build_self_signed_ca
from csr_service.pki.keys import KeyType, generate_key
from csr_service.pki.pem import cert_to_pem, key_to_pem, load_private_key

__all__ = ["DEV_ISSUER", "DevState", "dev_jwt_algorithm", "mint_dev_token", "prepare_dev_state"]

#: The ``iss`` of dev tokens (what a real cluster's --service-account-issuer would be).
DEV_ISSUER = "https://csr-service.dev.invalid"


@dataclass(frozen=True, slots=True)
class DevState:
    state_dir: Path
    ca_dir: Path
    root_cert: Path
    jwt_key: Path
    jwks: Path
    created: bool


def prepare_dev_state(state_dir: str | Path) -> DevState:
    """Create (first start) or reuse the dev CA and JWT key in ``state_dir``."""
    d = Path(state_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    ca_dir = d / "ca"
    ca_dir.mkdir(exist_ok=True)
    ca_dir.chmod(0o700)
    created = False
    if not (ca_dir / "ca-key.pem").exists():
        key = generate_key(KeyType.EC_P256)
        root = build_self_signed_ca(key, common_name="csr-service dev root CA")
        pem = cert_to_pem(root)
        # Write the key last: its presence marks the CA as complete on the next start.
        for name in ("ca-cert.pem", "cert-chain.pem", "root-cert.pem"):
            write_atomic(ca_dir / name, pem)
        write_atomic(ca_dir / "ca-key.pem", key_to_pem(key), mode=0o600)
        created = True
    write_atomic(d / "root-cert.pem", (ca_dir / "root-cert.pem").read_bytes())

    jwt_key_path = d / "jwt-signing-key.pem"
    if not jwt_key_path.exists():
        write_atomic(jwt_key_path, key_to_pem(generate_key(KeyType.RSA2048)), mode=0o600)
        created = True
    jwt_key = _load_jwt_key(jwt_key_path)
    alg = dev_jwt_algorithm(jwt_key)
    if isinstance(jwt_key, rsa.RSAPrivateKey):
        jwk_json = jwt.algorithms.RSAAlgorithm.to_jwk(jwt_key.public_key())
    else:
        jwk_json = jwt.algorithms.ECAlgorithm.to_jwk(jwt_key.public_key())
    jwk: dict[str, Any] = json.loads(jwk_json)
    jwk.update({"kid": _kid(jwk), "alg": alg, "use": "sig"})
    write_atomic(d / "jwks.json", json.dumps({"keys": [jwk]}, indent=2) + "\n")
    return DevState(
        state_dir=d,
        ca_dir=ca_dir,
        root_cert=d / "root-cert.pem",
        jwt_key=jwt_key_path,
        jwks=d / "jwks.json",
        created=created,
    )


def dev_jwt_algorithm(key: object) -> str:
    """RS256 for the RSA key new state directories get, ES256 for an older EC one."""
    return "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"


def _load_jwt_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = load_private_key(path.read_bytes())
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an RSA or EC key")
    return key


def _kid(jwk: dict[str, Any]) -> str:
    # RFC 7638 thumbprint, as Kubernetes derives its key ids.
    import base64
    import hashlib

    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def mint_dev_token(
    state_dir: str | Path,
    *,
    namespace: str,
    service_account: str,
    audiences: tuple[str, ...] = ("istio-ca",),
    ttl: timedelta = timedelta(hours=1),
    pod_name: str | None = None,
) -> str:
    """A JWT shaped like a projected service-account token, signed by the dev key."""
    d = Path(state_dir)
    key_path = d / "jwt-signing-key.pem"
    if not key_path.exists():
        raise FileNotFoundError(f"{key_path} not found: run `csr-service serve --dev --state-dir {d}` first")
    key = _load_jwt_key(key_path)
    jwks = json.loads((d / "jwks.json").read_text())
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "aud": list(audiences),
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl.total_seconds()),
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, service_account)),
            },
        },
    }
    if pod_name:
        claims["kubernetes.io"]["pod"] = {"name": pod_name, "uid": str(uuid.uuid4())}
    return jwt.encode(claims, key, algorithm=dev_jwt_algorithm(key), headers={"kid": jwks["keys"][0]["kid"]})
