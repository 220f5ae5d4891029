"""X.509 helpers shared by the pipeline, the issuers and the clients."""
