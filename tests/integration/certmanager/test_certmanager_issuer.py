"""The cert-manager issuer against the real cert-manager controllers and kube-apiserver.

Each outcome of a CertificateRequest, produced by the real thing: the CA Issuer and
ClusterIssuer sign; with the approver stopped a request is never approved (or we deny it
ourselves, as approver-policy would); an issuer that is not Ready; a request deleted or the
apiserver restarted while we wait; leftovers swept; and least-privilege RBAC.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.certmanager.issuer import (
    IDENTITIES_ANNOTATION,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    CertManagerIssuer,
)
from tests.integration.certmanager.support import (
    LEAST_PRIVILEGE_VERBS,
    list_ours,
    make_issuer,
    service_account_kubeconfig,
)
from tests.support import pki
from tests.support.certs import WORKLOAD, csr_pem
from tests.support.issuers import run_issuer as run
from tests.support.issuers import signing_request
from tests.support.pki import new_key
from tests.support.waiting import wait_for
from tests.testbed.certmanager import GROUP, VERSION, CertManager, condition
from tests.testbed.kube import unique_name

pytestmark = pytest.mark.certmanager


def _instance_requests(cm: CertManager, issuer: CertManagerIssuer) -> list[Any]:
    return list_ours(cm, f"{INSTANCE_LABEL}={issuer.instance}")


def _on_first_request(cm: CertManager, issuer: CertManagerIssuer, action: Callable[[str], None]) -> threading.Thread:
    """In a thread: wait for the issuer's first CertificateRequest, then ``action(name)``."""

    def body() -> None:
        items = wait_for(lambda: _instance_requests(cm, issuer), what="the CertificateRequest")
        action(items[0]["metadata"]["name"])

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["Issuer", "ClusterIssuer"])
def test_signs_and_cleans_up(cert_manager: CertManager, kind: str) -> None:
    cm = cert_manager
    issuer = make_issuer(cm, kind=kind)
    req = signing_request()
    # create/delete go over the event-loop client with the admin kubeconfig's client certificate.
    assert issuer.event_loop_calls

    issued: IssuedChain = run(issuer, lambda i: i.sign(req))

    assert issued.leaf.public_key() == req.csr.public_key()
    assert pki.spiffe_uris(issued.leaf) == [WORKLOAD]
    ku = issued.leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    eku = issued.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_pem = cm.issuer_ca_pem if kind == "Issuer" else cm.cluster_issuer_ca_pem
    path = pki.verify_chain(issued.leaf, issued.chain, pki.load_certs(root_pem))
    assert path[-1] == pki.load_certs(root_pem)[0]
    # Deleted once finished (asynchronously, right after the answer).
    wait_for(lambda: not _instance_requests(cm, issuer), what="the request to be deleted")


def test_serving_certificate_names(cert_manager: CertManager) -> None:
    """csr-service's own serving certificate (DNS/IP names, no URI) comes through the same path."""
    dns, ips = ("csr-service.cert-manager.svc",), ("127.0.0.1",)
    pem = csr_pem(new_key(), uris=(), dns_names=dns, ip_addresses=ips)
    req = SigningRequest(
        csr=x509.load_pem_x509_csr(pem),
        csr_pem=pem,
        ttl=timedelta(hours=1),
        dns_names=dns,
        ip_addresses=ips,
        purpose="serving",
    )

    issued: IssuedChain = run(make_issuer(cert_manager), lambda i: i.sign(req))

    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(dns)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == list(ips)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []


def test_preserve_keeps_the_request_with_our_metadata(cert_manager: CertManager) -> None:
    cm = cert_manager
    issuer = make_issuer(
        cm, preserve_certificate_requests=True, certmanager_additional_annotations=("example.com/team=mesh",)
    )
    run(issuer, lambda i: i.sign(signing_request()))

    [cr] = _instance_requests(cm, issuer)
    meta, spec = cr["metadata"], cr["spec"]
    assert meta["name"].startswith("csr-service-")
    assert meta["labels"][MANAGED_BY_LABEL] == "csr-service"
    assert meta["annotations"][IDENTITIES_ANNOTATION] == WORKLOAD
    assert meta["annotations"]["example.com/team"] == "mesh"
    assert spec["usages"] == ["digital signature", "key encipherment", "server auth", "client auth"]
    assert spec["duration"] == "1800s"
    assert spec["isCA"] is False
    assert condition(cr, "Ready") == "True"
    cm.custom.delete_namespaced_custom_object(GROUP, VERSION, cm.issuer_namespace, "certificaterequests", meta["name"])


def test_never_approved_times_out_naming_approval(
    cert_manager_no_approver: CertManager, caplog: pytest.LogCaptureFixture
) -> None:
    cm = cert_manager_no_approver
    issuer = make_issuer(cm, certmanager_timeout=timedelta(seconds=3))
    caplog.set_level(logging.WARNING, "issuers.certmanager")

    with pytest.raises(DeadlineExceededError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    assert "not approved in time" in info.value.public
    assert "waiting for approval" in caplog.text
    wait_for(lambda: not _instance_requests(cm, issuer), what="the timed-out request to be deleted")


def test_denied_is_permission_denied(cert_manager_no_approver: CertManager) -> None:
    cm = cert_manager_no_approver
    issuer = make_issuer(cm)
    deny = _on_first_request(
        cm, issuer, lambda name: cm.set_approval(cm.issuer_namespace, name, approved=False, reason="policy.test")
    )

    with pytest.raises(PermissionDeniedError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    deny.join(5)
    assert "denied" in info.value.public
    assert "policy.test" in info.value.detail


def test_issuer_not_ready_is_failed_precondition(cert_manager: CertManager) -> None:
    cm = cert_manager
    name = unique_name("broken-ca")
    # A CA issuer whose secret does not exist never becomes Ready.
    cm.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        cm.issuer_namespace,
        "issuers",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Issuer",
            "metadata": {"name": name},
            "spec": {"ca": {"secretName": f"{name}-missing"}},
        },
    )
    wait_for(lambda: condition(cm.get_issuer(name, cm.issuer_namespace), "Ready") == "False", what="issuer False")
    issuer = make_issuer(cm, certmanager_issuer_name=name, certmanager_timeout=timedelta(seconds=4))

    with pytest.raises(FailedPreconditionError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    assert f"Issuer {cm.issuer_namespace}/{name} is not ready" in info.value.public
    assert "does not have a Ready status condition" in info.value.detail


def test_missing_issuer_is_failed_precondition(cert_manager: CertManager) -> None:
    cm = cert_manager
    issuer = make_issuer(cm, certmanager_issuer_name="does-not-exist", certmanager_timeout=timedelta(seconds=4))

    with pytest.raises(FailedPreconditionError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    assert "not found" in info.value.detail


def test_request_deleted_while_waiting_is_unavailable(cert_manager_no_approver: CertManager) -> None:
    cm = cert_manager_no_approver
    issuer = make_issuer(cm)
    remover = _on_first_request(
        cm,
        issuer,
        lambda name: cm.custom.delete_namespaced_custom_object(
            GROUP, VERSION, cm.issuer_namespace, "certificaterequests", name
        ),
    )

    with pytest.raises(UnavailableError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    remover.join(5)
    assert "deleted" in info.value.public


def test_apiserver_restart_while_waiting(cert_manager_no_approver: CertManager) -> None:
    """The shared watch reconnects (and re-reads) after the apiserver comes back; the request completes."""
    cm = cert_manager_no_approver
    issuer = make_issuer(cm, certmanager_timeout=timedelta(seconds=120))
    outcome: dict[str, Any] = {}

    def sign_in_background() -> None:
        try:
            outcome["issued"] = run(issuer, lambda i: i.sign(signing_request()))
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    # The issuer waits in a thread: the apiserver must be restarted from the main thread, since a
    # test-bed process dies with the thread that started it (PR_SET_PDEATHSIG).
    signer = threading.Thread(target=sign_in_background, daemon=True)
    signer.start()
    [cr] = wait_for(lambda: _instance_requests(cm, issuer), what="the CertificateRequest")
    starts_before = issuer.watch.watch_starts
    cm.kube.restart_apiserver(down_for=1.0)
    cm.set_approval(cm.issuer_namespace, cr["metadata"]["name"], approved=True)
    signer.join(150)

    assert "error" not in outcome, outcome.get("error")
    assert pki.spiffe_uris(outcome["issued"].leaf) == [WORKLOAD]
    assert issuer.watch.watch_starts > starts_before, "the watch must have been re-established"


def test_sweeper_removes_old_leftovers_only(cert_manager_no_approver: CertManager) -> None:
    cm = cert_manager_no_approver
    csr, _ = pki.make_csr(WORKLOAD)
    # A crashed process's requests carry our managed-by label but another instance label.
    leftovers = [
        cm.create_certificate_request(
            cm.issuer_namespace, csr, labels={MANAGED_BY_LABEL: "csr-service", INSTANCE_LABEL: "crashed"}
        )
        for _ in range(3)
    ]
    foreign = cm.create_certificate_request(cm.issuer_namespace, csr)
    issuer = make_issuer(cm)

    async def body(i: CertManagerIssuer) -> tuple[int, int]:
        young = await i.sweep_once(max_age=timedelta(hours=1))
        # The behaviour under test is an age limit: let the requests grow older than max_age
        # (1 s) by their creationTimestamp, which has one-second resolution.
        await asyncio.sleep(2.5)
        return young, await i.sweep_once(max_age=timedelta(seconds=1))

    young, old = run(issuer, body)

    assert young == 0
    assert old >= len(leftovers)
    names = {cr["metadata"]["name"] for cr in list_ours(cm, "")}
    assert not names & set(leftovers)
    assert foreign in names


def test_least_privilege_service_account(cert_manager: CertManager) -> None:
    """create/get/list/watch/delete on certificaterequests in one namespace is all it needs."""
    cm = cert_manager
    kubeconfig = service_account_kubeconfig(cm.kube, cm.issuer_namespace, LEAST_PRIVILEGE_VERBS)
    issuer = make_issuer(cm, kubeconfig=kubeconfig)
    # ... and with a ServiceAccount token (bearer) on that same client.
    assert issuer.event_loop_calls

    issued: IssuedChain = run(issuer, lambda i: i.sign(signing_request()))

    assert pki.spiffe_uris(issued.leaf) == [WORKLOAD]
    wait_for(lambda: not _instance_requests(cm, issuer), what="the request to be deleted")


def test_missing_rbac_is_named_at_start(cert_manager: CertManager) -> None:
    cm = cert_manager
    kubeconfig = service_account_kubeconfig(cm.kube, cm.issuer_namespace, ["create", "get", "list", "watch"])
    issuer = make_issuer(cm, kubeconfig=kubeconfig)

    with pytest.raises(FailedPreconditionError) as info:
        run(issuer, lambda i: i.sign(signing_request()))

    assert "delete" in info.value.public
    assert "certificaterequests.cert-manager.io" in info.value.public


def test_restart_storm_is_served_by_one_watch(cert_manager: CertManager) -> None:
    """60 requests at once (30 two-pod deployments restarting) all complete on the shared watch.

    The default client limit (burst 400) absorbs the 120 API calls without throttling; a
    per-request watch would have opened 60 streams.
    """
    cm = cert_manager
    issuer = make_issuer(cm, certmanager_timeout=timedelta(seconds=90))
    reqs = [signing_request(f"spiffe://cluster.local/ns/storm/sa/app-{i}") for i in range(60)]

    async def body(i: CertManagerIssuer) -> tuple[list[IssuedChain], int]:
        issued = await asyncio.gather(*(i.sign(r) for r in reqs))
        return list(issued), i.watch.watch_starts

    issued, watch_starts = run(issuer, body)

    assert [pki.spiffe_uris(c.leaf) for c in issued] == [list(r.uris) for r in reqs]
    assert watch_starts <= 2  # one watch (plus at most one routine server-side timeout)
    wait_for(lambda: not _instance_requests(cm, issuer), what="all requests deleted")
