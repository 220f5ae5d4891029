"""Authentication and impersonation against the test-bed kube-apiserver (marker ``kube``)."""
