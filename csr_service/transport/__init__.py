"""Transport: the gRPC server (TLS, health, reflection), its thin servicer, serving certificate."""
