"""``csr-service agent``: keep a workload certificate fresh for an application without a sidecar.

A client of any Istio CA (csr-service or istiod's built-in CA), not part of the server: it makes
the call istio-agent makes (:mod:`csr_service.client`) again and again and publishes the result.

    settings.py   flags (with gen-istio-cert's names as aliases), validated once; token claims
    schedule.py   when to renew (a fraction of the lifetime, with jitter) and how to back off
    ca.py         the CA connection: root file re-read on change, token re-read per call
    outputs.py    where certificates go: a directory (one atomic set) or a kubernetes.io/tls Secret
    rotator.py    the loop for one output: adopt, renew, follow root changes and tampering, retry
    hooks.py      after a write: --on-rotate command, --signal to a process
    run.py        wiring: outputs, leader election for the Secret, /healthz, /readyz, /metrics, --once
"""
