"""Talking to Kubernetes: one client factory shared by authenticators, issuers and controllers."""
