"""The extension points of csr-service, and the only part of it plugins need to know.

- :mod:`.issuer`: the issuer contract (``Issuer``, ``SigningRequest``, ``IssuedChain``, the
  optional abilities) that every backend implements and ``tests/conformance`` checks;
- :mod:`.authenticator`: the authenticator contract (``Authenticator``, ``Caller``);
- :mod:`.registry`: ``Plugin`` and how plugins are found (entry-point groups
  ``csr_service.issuers`` and ``csr_service.authenticators``);
- :mod:`.runtime`: ``Runtime``, what a plugin's factory receives besides its own options.

A plugin may also use: :mod:`csr_service.common.errors` (the error classes it raises),
:mod:`csr_service.common.options` (to declare options), :mod:`csr_service.common.lifecycle`
(``BackgroundTask``), :mod:`csr_service.pki` (X.509 helpers), :mod:`csr_service.infra.httpclient`
and :mod:`csr_service.infra.cpu`, and :mod:`csr_service.kube` (the Kubernetes clients). That is
the whole public surface; ``tests/unit/test_layering.py`` keeps the built-in issuers to it.
"""
