"""csr-service: an external certificate authority for Istio.

Serves ``istio.v1.auth.IstioCertificateService/CreateCertificate`` (the API istio-agent and
ztunnel call at ``values.global.caAddress``), authenticates each caller, checks that the CSR
asks for exactly the caller's SPIFFE identity, caps the lifetime, and has a pluggable issuer
sign it.

Layout (transport → request pipeline → issuers):

- ``csr_service.transport``: the gRPC server (TLS, health, reflection) and its thin servicer.
- ``csr_service.pipeline``: authenticate → cluster id → validate CSR → duration → sign → verify.
- ``csr_service.plugins.registry``: the issuer contract and its backends (local CA, ...).
- ``csr_service.pki``: X.509 helpers shared by all of the above.
"""

__version__ = "0.1.0"
