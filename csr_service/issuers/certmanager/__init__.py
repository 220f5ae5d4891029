"""The cert-manager issuer: signs through ``cert-manager.io/v1`` CertificateRequests."""
