"""The client-side rate limiter in front of the Kubernetes API."""

from __future__ import annotations

import threading
import time

import pytest

from csr_service.common.errors import ConfigError
from csr_service.config import resolve
from csr_service.kube.client import KubeSettings, TokenBucket, new_api_client


def test_burst_is_free_then_rate_applies() -> None:
    bucket = TokenBucket(qps=100, burst=5)
    waits = [bucket.acquire() for _ in range(5)]
    assert waits == [0.0] * 5
    assert bucket.acquire() > 0  # the 6th waits for a token


def test_rate_is_respected_across_threads() -> None:
    bucket = TokenBucket(qps=200, burst=1)
    start = time.monotonic()
    threads = [threading.Thread(target=lambda: [bucket.acquire() for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 40 tokens at 200/s with a burst of 1 cannot take less than ~0.19 s (a lower bound, not a timing assert
    # on speed: the machine may be slow, never fast beyond physics).
    assert time.monotonic() - start >= 0.19


def test_zero_qps_disables() -> None:
    assert TokenBucket(qps=0, burst=0).acquire() == 0.0


def test_missing_kubeconfig_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="--kubeconfig"):
        new_api_client(KubeSettings.from_values(resolve({}, env={})))


def test_negative_qps_rejected() -> None:
    with pytest.raises(ConfigError, match="--kube-qps"):
        KubeSettings.from_values(resolve({"kube-qps": "-1"}, env={}))
