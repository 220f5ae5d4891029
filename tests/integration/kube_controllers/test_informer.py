"""The informer against the real apiserver: 410 Gone, and an apiserver restart.

410: between the first list and its watch, objects change and etcd is compacted (what a long
disconnect looks like); the watch from the list's resourceVersion gets 410 Gone, the informer re-lists and
synthesises the events it missed in between. Restart: kube-apiserver is stopped and started
again on the same port and etcd; the watch reconnects and sees later changes.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import urllib.request
from typing import Any

import pytest
from kubernetes import client as k8s

from csr_service.kube.informer import Informer
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: str, obj: Any) -> None:
        with self._lock:
            self.events.append((kind, obj.metadata.name))

    def saw(self, kind: str, name: str) -> bool:
        with self._lock:
            return (kind, name) in self.events


def _cm(name: str) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data={"k": "v"})


def _etcd(etcd_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(etcd_url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def _compact_etcd(etcd_url: str) -> None:
    """Compact etcd's history up to now (the apiserver does this every 5 minutes)."""
    rev = _etcd(etcd_url, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"]
    _etcd(etcd_url, "/v3/kv/compaction", {"revision": rev, "physical": True})


def test_410_gone_relists_and_synthesises_missed_events(own_kube: KubeCluster) -> None:
    # Without the watch cache, a watch from a compacted resourceVersion reaches etcd and gets
    # 410 (with it, 410 needs minutes of history to age out of the cache).
    own_kube.restart_apiserver("--watch-cache=false")
    kube = own_kube
    ns = kube.create_namespace()
    kube.core.create_namespaced_config_map(ns, _cm("before"))
    calls = {"n": 0}

    # wraps: the watch learns the object type from the list method's docstring.
    @functools.wraps(kube.core.list_namespaced_config_map)
    def stale_first_list(**kwargs: Any) -> Any:
        result = kube.core.list_namespaced_config_map(ns, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            # What happens between a list and a late watch: changes, then compaction.
            kube.core.create_namespaced_config_map(ns, _cm("added-in-gap"))
            kube.core.delete_namespaced_config_map("before", ns)
            _compact_etcd(kube.etcd_url)
        return result

    rec = Recorder()
    inf = Informer(stale_first_list, rec, name="gone-test")
    inf.start()
    try:
        wait_for(lambda: inf.stats["gone"] >= 1, what="410 Gone seen")
        wait_for(lambda: rec.saw("ADDED", "added-in-gap") and rec.saw("DELETED", "before"), what="synthesised events")
        assert set(inf.cache) == {f"{ns}/added-in-gap"}
        kube.core.create_namespaced_config_map(ns, _cm("after"))
        wait_for(lambda: rec.saw("ADDED", "after"), what="watch resumed after the re-list")
        assert inf.stats["lists"] == 2, inf.stats  # the first list, and one re-list after the 410
    finally:
        inf.stop()


def test_watch_recovers_from_an_apiserver_restart(own_kube: KubeCluster) -> None:
    ns = own_kube.create_namespace(unique_name("restart"))
    own_kube.core.create_namespaced_config_map(ns, _cm("one"))
    rec = Recorder()
    inf = Informer(own_kube.core.list_namespaced_config_map, rec, name="restart-test", list_kwargs={"namespace": ns})
    inf.start()
    try:
        assert inf.wait_synced(30)
        assert rec.saw("ADDED", "one")
        watches = inf.stats["watches"]
        own_kube.restart_apiserver()
        own_kube.core.create_namespaced_config_map(ns, _cm("two"))
        own_kube.core.delete_namespaced_config_map("one", ns)
        wait_for(lambda: rec.saw("ADDED", "two") and rec.saw("DELETED", "one"), timeout=90, what="events after restart")
        assert inf.stats["errors"] >= 1
        assert inf.stats["watches"] > watches
        assert set(inf.cache) == {f"{ns}/two"}
    finally:
        inf.stop()
