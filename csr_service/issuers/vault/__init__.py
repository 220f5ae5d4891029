"""The Vault / OpenBao PKI issuer (``--issuer vault``); needs the ``vault`` extra (hvac)."""
