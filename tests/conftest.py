"""Root conftest: registers the test-bed plugin (fixtures and collection hooks).

``tests.testbed.fixtures`` provides the peer fixtures (``kube``, ``own_kube``, ``openbao``,
``openbao_kube_auth``, ``cert_manager``, ``cert_manager_no_approver``, ``istio_client``). Before
the first test runs it builds, or takes from the cache, just the components the selected tests
need, outside per-test timeouts (``pytest -m vault`` builds only OpenBao); and a test that uses a
peer fixture without the matching marker is a usage error, so ``-m`` selections stay honest.

gRPC's fork support is off in the test process (unless the environment says otherwise). With
it on, gRPC core runs its fork handlers in every child the test bed forks, and when another
thread of the test is in the middle of gRPC calls (a background load while the test restarts a
peer) the child aborts in them (``ev_epoll1_linux.cc: Check failed: next_worker->state ==
KICKED``) and the peer never starts. The test bed's children only exec; none uses gRPC. Core
reads the setting when ``grpc`` is first imported, so it is set here, before any plugin or test
module is imported.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = ["tests.testbed.fixtures"]
