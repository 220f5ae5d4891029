"""csr-service's built-in issuer plugins, one package each.

- ``issuers.local``: a CA keypair held by csr-service (a directory, a mounted Secret, or Vault KV);
- ``issuers.vault``: a Vault / OpenBao PKI role;
- ``issuers.certmanager``: cert-manager CertificateRequests;
- ``issuers.vault_connection``: the Vault client and its options, shared by ``vault`` and by
  ``local``'s Vault-KV CA source (not a plugin itself).

Each plugin package's ``__init__`` declares a :class:`csr_service.plugins.registry.Plugin`
named ``PLUGIN`` and imports only its ``options`` module; ``pyproject.toml`` registers it in
the entry-point group ``csr_service.issuers``. Backends use only the public surface listed in
:mod:`csr_service.plugins`, and the core never imports them (``tests/unit/test_layering.py``).
"""
