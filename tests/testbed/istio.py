"""Run the Istio conformance client (``go/clients/cmd/istio-client``) and parse its JSON answer.

The Go program is istio.io/istio's own sidecar code path — ``citadel.NewCitadelClient`` +
``CSRSign``, ``pki/util.GenCSR`` and the Kubernetes token plugin — so a CA that satisfies it
satisfies istio-agent.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from tests.support import pki
from tests.testbed.install import ensure


@dataclass
class IstioResult:
    """What the client reported.

    ``ok`` is True when it exited 0 with a chain; otherwise ``code``/``message`` carry the gRPC
    status name (e.g. ``UNAUTHENTICATED``) and message. ``stderr`` has the client's own log.
    """

    returncode: int
    cert_chain: list[str] = field(default_factory=list)
    key_type: str = ""
    identity: str = ""
    private_key: str = ""
    code: str = ""
    message: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """Whether a certificate chain was obtained."""
        return self.returncode == 0 and bool(self.cert_chain)

    @property
    def leaf(self) -> x509.Certificate:
        """The first certificate of the chain."""
        return pki.load_certs(self.cert_chain[0])[0]

    @property
    def certificates(self) -> list[x509.Certificate]:
        """Every certificate in the chain, in order (an element may hold several PEM blocks)."""
        return [c for element in self.cert_chain for c in pki.load_certs(element)]


class IstioClient:
    """Callable wrapper around the ``istio-client`` binary.

    ``client(ca_address=..., root_cert=..., token=..., namespace=..., service_account=...)`` runs
    one CreateCertificate exactly as a sidecar would and returns an ``IstioResult``. Pass either
    ``token`` (the JWT text; written to a temp file) or ``token_file``, and/or ``cert_chain`` and
    ``key`` (a certificate presented in TLS, as istio-agent does with ``PROV_CERT``); with neither
    token nor token file no authorization header is sent.
    """

    def __init__(self, binary: Path | None = None) -> None:
        self.binary = binary or ensure("istio-client")

    def __call__(
        self,
        *,
        ca_address: str,
        root_cert: Path | str,
        namespace: str = "",
        service_account: str = "",
        token: str | None = None,
        token_file: Path | None = None,
        cluster_id: str = "Kubernetes",
        trust_domain: str = "cluster.local",
        key_type: str = "rsa",
        ttl: str = "1h",
        impersonate: str | None = None,
        ca_san: str | None = None,
        cert_chain: Path | None = None,
        key: Path | None = None,
        renewals: int = 0,
        renew_after: float = 0.0,
        cert_signer: str = "",
        timeout: float = 120,
    ) -> IstioResult:
        """Request a certificate; see the class docstring."""
        with tempfile.TemporaryDirectory(prefix="istio-client-") as tmp:
            if token is not None:
                token_file = Path(tmp) / "istio-token"
                token_file.write_text(token)
            argv = [
                str(self.binary),
                f"--ca-address={ca_address}",
                f"--root-cert={root_cert}",
                f"--token-file={token_file or ''}",
                f"--cluster-id={cluster_id}",
                f"--trust-domain={trust_domain}",
                f"--namespace={namespace}",
                f"--service-account={service_account}",
                f"--key-type={key_type}",
                f"--ttl={ttl}",
            ]
            if impersonate:
                argv.append(f"--impersonate={impersonate}")
            if ca_san:
                argv.append(f"--ca-san={ca_san}")
            if cert_chain is not None and key is not None:  # PROV_CERT: present this pair in TLS
                argv += [f"--cert-chain={cert_chain}", f"--key={key}"]
            if renewals:
                argv += [f"--renewals={renewals}", f"--renew-after={renew_after}s"]
            if cert_signer:  # ISTIO_META_CERT_SIGNER: istiod's per-workload Kubernetes CSR signer
                argv.append(f"--cert-signer={cert_signer}")
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode == 2:
            raise ValueError(f"istio-client usage error: {proc.stderr.strip()}")
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            msg = f"istio-client exited {proc.returncode} without JSON.\nstdout: {proc.stdout}"
            msg += f"\nstderr: {proc.stderr}"
            raise RuntimeError(msg) from None
        return IstioResult(
            returncode=proc.returncode,
            cert_chain=list(out.get("cert_chain", [])),
            key_type=str(out.get("key_type", "")),
            identity=str(out.get("identity", "")),
            private_key=str(out.get("private_key", "")),
            code=str(out.get("code", "")),
            message=str(out.get("message", "")),
            stderr=proc.stderr,
        )
