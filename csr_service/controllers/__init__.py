"""Controllers that keep Kubernetes objects in line with csr-service's state.

One module each: ``leader`` (Lease-based leader election and the gate for leader-only work),
``root_configmaps`` (the ``istio-ca-root-cert`` ConfigMap in every namespace),
``istiod_cert`` (Secret ``istiod-tls`` for istiod with ``ENABLE_CA_SERVER=false``),
``runtime_issuer`` (the active issuer chosen by a watched ConfigMap). Each is a
:class:`csr_service.common.lifecycle.Component`. This package's ``__init__`` and ``options`` import
nothing heavy: the configuration imports them on every start.
"""
