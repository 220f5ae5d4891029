"""Storms and chaos against the real peers: a mesh restart, a killed leader, restarted OpenBao
and kube-apiserver, all under load from simulated istio-agents (``tests/support/mesh.py``)."""
