"""The request pipeline, one small step per module, run in this order by ``handler``:

authenticate (``authn``) → check cluster id (``clusterid``) → validate the CSR (``csr``)
→ decide the lifetime (``duration``) → issuer signs → verify the chain (``verify``) → respond.
"""
