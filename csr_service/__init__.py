"""csr-service: an external certificate authority for Istio.

Serves ``istio.v1.auth.IstioCertificateService/CreateCertificate`` (the API istio-agent and
ztunnel call at ``values.global.caAddress``), authenticates each caller, checks that the CSR
asks for exactly the caller's SPIFFE identity, caps the lifetime, and has a pluggable issuer
sign it.

Layout, lowest layer first (a module imports only from its own layer or below;
``tests/unit/test_layering.py`` keeps it so):

- ``common``: vocabulary (errors, identity, options, lifecycle, readiness, a request's context);
  ``infra``: plumbing (HTTP client, CPU offload, files, logs, metrics); ``pki``: X.509 helpers;
- ``kube``: Kubernetes clients, informers and caches;
- ``plugins``: the issuer and authenticator contracts, the registry (entry points) and the
  ``Runtime`` plugins receive; ``trust``: the trust bundle and its sources;
- ``pipeline``: authenticate → cluster id → validate CSR → duration → sign → verify;
- ``transport``: the gRPC server and its thin servicer, the HTTP side, the serving certificate;
- ``controllers``: Kubernetes controllers (root ConfigMaps, istiod-tls, leader, runtime issuer);
- ``config``: the validated configuration; ``service``: wiring, worker supervisor, health;
- ``cli``: the command line.

The issuer backends are plugins in the top-level ``issuers`` package; the core never imports them.
"""

__version__ = "0.1.0"
