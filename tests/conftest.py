"""Root conftest: registers the test-bed plugin (fixtures and collection hooks).

``tests.testbed.fixtures`` provides the peer fixtures (``kube``, ``openbao``, ``openbao_kube_auth``,
``cert_manager``, ``cert_manager_no_approver``, ``istio_client``). Before the first test runs it
builds, or takes from the cache, just the components the selected tests need, outside per-test
timeouts (``pytest -m vault`` builds only OpenBao); and a test that uses a peer fixture without
the matching marker is a usage error, so ``-m`` selections stay honest.
"""

pytest_plugins = ["tests.testbed.fixtures"]
