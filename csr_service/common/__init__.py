"""Vocabulary every layer shares: the error hierarchy and its gRPC table, SPIFFE identities,
options (flag/env/file), durations, the lifecycle vocabulary and background-task helper,
readiness checks, and a call's request context. Imports nothing else of csr_service."""
