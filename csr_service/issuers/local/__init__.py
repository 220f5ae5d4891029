"""The local CA issuer: signs with a CA keypair held by csr-service itself."""
