"""The trust bundle (the roots workloads trust and every issued chain is verified against)
and where it comes from: a file, a ConfigMap or a Secret, watched (``sources``)."""
