"""``csr-service agent`` against ``csr-service serve --dev`` (both as subprocesses): the files it
writes, rotation observed several times, a root change followed, the CA down at start and
during rotation, hooks, and the refusals at start (wrong token, wrong root, unwritable dir)."""

from __future__ import annotations

import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.support import pki
from tests.support.agent import agent_args, run_agent_once, running_agent
from tests.support.certs import write_ca_dir
from tests.support.dev_server import DevServer, free_port, running_dev_server, running_server
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

ID = "spiffe://cluster.local/ns/apps/sa/prom"
#: Short certificates renewed early: a rotation every ~6 s (csr-service's minimum lifetime is 1 minute).
FAST = ["--ttl", "1m", "--renew-at", "0.1", "--renew-jitter", "0", "--check-interval", "1s"]
FAST_BACKOFF = ["--backoff-initial", "200ms", "--backoff-max", "1s"]


def _token(srv: DevServer, tmp: Path, sa: str = "prom") -> Path:
    path = tmp / f"token-{sa}"
    path.write_text(srv.token("apps", sa))
    return path


def _files(out: Path) -> tuple[list[x509.Certificate], pki.PrivateKey, list[x509.Certificate]]:
    """(chain, key, roots) as a reader of the directory sees them, read through one version."""
    data = out / "..data"
    return (
        pki.load_certs((data / "cert-chain.pem").read_bytes()),
        pki.load_key((data / "key.pem").read_bytes()),
        pki.load_certs((data / "root-cert.pem").read_bytes()),
    )


def _assert_good_set(out: Path, roots: list[x509.Certificate]) -> x509.Certificate:
    chain, key, got_roots = _files(out)
    assert got_roots == roots
    assert pki.spiffe_uris(chain[0]) == [ID]
    assert pki.key_matches(chain[0], key)
    pki.verify_chain(chain[0], chain[1:], roots)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    return chain[0]


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa2048"])
def test_once_writes_the_workload_files(dev_server: DevServer, tmp_path: Path, key_type: str) -> None:
    out = tmp_path / "certs"
    args = agent_args(
        ca_address=dev_server.address,
        root_cert=dev_server.root_cert,
        token_file=_token(dev_server, tmp_path),
        out_dir=out,
    )
    res = run_agent_once([*args, "--key-type", key_type, "--tls-secret-layout"])
    assert res.returncode == 0, res.stderr
    roots = pki.load_certs(dev_server.root_cert.read_bytes())
    leaf = _assert_good_set(out, roots)
    # The kubernetes.io/tls names hold the same set, the key 0600 too.
    assert (out / "tls.crt").read_bytes() == (out / "cert-chain.pem").read_bytes()
    assert (out / "tls.key").read_bytes() == (out / "key.pem").read_bytes()
    assert (out / "ca.crt").read_bytes() == (out / "root-cert.pem").read_bytes()
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert {"ec-p256": 256, "ec-p384": 384, "rsa2048": 2048}[key_type] == leaf.public_key().key_size
    assert "valid until" in res.stdout
    assert "BEGIN" not in res.stdout + res.stderr


def test_rotates_repeatedly_follows_a_root_change_and_runs_hooks(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = tmp_path / "certs"
    hook_log = tmp_path / "hook.log"
    hook = shlex.join([sys.executable, "-c", f"open({str(hook_log)!r}, 'a').write('rotated\\n')"])
    # An application that reloads on SIGHUP: counts the signals it gets.
    with (tmp_path / "app.out").open("wb") as app_out:
        app = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal,sys,time\n"
                "signal.signal(signal.SIGHUP, lambda *a: (sys.stdout.write('hup\\n'), sys.stdout.flush()))\n"
                "time.sleep(600)",
            ],
            stdout=app_out,
        )
    (tmp_path / "app.pid").write_text(str(app.pid))
    try:
        with running_dev_server(state, "--local-ca-reload-interval", "1s") as srv:
            args = agent_args(
                ca_address=srv.address, root_cert=srv.root_cert, token_file=_token(srv, tmp_path), out_dir=out
            )
            extra = ["--on-rotate", hook, "--signal-pid-file", str(tmp_path / "app.pid"), "--signal", "HUP"]
            with running_agent([*args, *FAST, *extra], tmp_path / "agent.log") as agent:
                old_roots = pki.load_certs(srv.root_cert.read_bytes())
                serials: set[int] = set()
                keys: set[bytes] = set()

                def rotated_three_times() -> bool:
                    try:
                        leaf = _assert_good_set(out, old_roots)
                        serials.add(leaf.serial_number)
                        keys.add((out / "..data" / "key.pem").read_bytes())
                    except FileNotFoundError:
                        pass
                    return len(serials) >= 4

                wait_for(rotated_three_times, timeout=90, interval=0.5, what="three renewals")
                assert len(keys) >= 4  # a new key every time
                assert agent.ready()
                assert agent.metric_sum(r'csr_service_agent_rotations_total\{.*reason="renewal".*\}') >= 3
                # Rotate the CA; dev mode republishes the bundle (old + new root) like the
                # istio-ca-root-cert ConfigMap, and the agent follows at once.
                _, _, new_root = write_ca_dir(state / "ca")
                with (state / "ca" / "root-cert.pem").open("a") as fh:
                    fh.write(pki.certs_pem(*old_roots))

                def on_new_root() -> bool:
                    chain, _, roots = _files(out)
                    return roots[0] == new_root and pki.verify_chain(chain[0], chain[1:], [new_root]) is not None

                wait_for(
                    on_new_root,
                    timeout=60,
                    interval=0.5,
                    what="a certificate under the new root",
                    ignoring=(FileNotFoundError, ValueError, Exception),
                )
                _assert_good_set(out, [new_root, *old_roots])
                assert agent.metric_sum(r'csr_service_agent_rotations_total\{.*reason="root-changed".*\}') >= 1
                log = agent.log()
        writes = len(hook_log.read_text().splitlines())
        assert writes >= 5
        wait_for(lambda: (tmp_path / "app.out").read_text().count("hup") >= 5, timeout=10, what="SIGHUPs")
        # Nothing secret in the log: no key, no token.
        assert "PRIVATE KEY" not in log
        assert srv.token("apps", "prom")[:40] not in log
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait()


def _serve_on(state: Path, port: int, log: Path) -> object:
    return running_server(
        ["--dev", "--state-dir", str(state), "--grpc-listen", f"127.0.0.1:{port}", "--workers", "1"],
        root_cert=state / "root-cert.pem",
        state_dir=state,
        log_path=log,
        port=port,
    )


def test_ca_down_at_start_and_during_rotation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = tmp_path / "certs"
    port = free_port()
    # The dev state (CA, token key) exists before the server first runs.
    from csr_service.service.dev import mint_dev_token, prepare_dev_state

    prepare_dev_state(str(state))
    token = tmp_path / "token"
    token.write_text(
        mint_dev_token(
            str(state),
            namespace="apps",
            service_account="prom",
            audiences=("istio-ca",),
            ttl=__import__("datetime").timedelta(hours=1),
            pod_name=None,
        )
    )
    args = agent_args(ca_address=f"127.0.0.1:{port}", root_cert=state / "root-cert.pem", token_file=token, out_dir=out)
    with running_agent([*args, *FAST, *FAST_BACKOFF], tmp_path / "agent.log") as agent:
        wait_for(
            lambda: agent.metric_sum(r'csr_service_agent_failures_total\{.*code="UNAVAILABLE".*\}') >= 2,
            timeout=30,
            what="failed attempts while the CA is down",
            ignoring=(OSError,),
        )
        status, body = agent.readyz()
        assert status == 503
        assert "no certificate written yet" in body
        assert "UNAVAILABLE" in body
        with _serve_on(state, port, tmp_path / "s1.log"):  # type: ignore[attr-defined]
            wait_for(agent.ready, timeout=30, what="the agent to recover by itself")
        roots = pki.load_certs((state / "root-cert.pem").read_bytes())
        held = _assert_good_set(out, roots)
        failures = agent.metric_sum(r"csr_service_agent_failures_total\{.*\}")
        # The CA is down during a renewal: the certificate stays, still ready while valid.
        wait_for(
            lambda: agent.metric_sum(r"csr_service_agent_failures_total\{.*\}") >= failures + 3,
            timeout=30,
            what="failed renewals",
        )
        assert _assert_good_set(out, roots) == held
        assert agent.ready(), agent.readyz()[1]
        assert "renewal failing: UNAVAILABLE" in agent.readyz()[1]
        assert "keeping the current certificate" in agent.log()
        with _serve_on(state, port, tmp_path / "s2.log"):  # type: ignore[attr-defined]
            wait_for(
                lambda: _files(out)[0][0] != held,
                timeout=30,
                what="a renewal after the CA came back",
                ignoring=(FileNotFoundError,),
            )
            _assert_good_set(out, roots)
            wait_for(lambda: "renewal failing" not in agent.readyz()[1], timeout=10, what="readiness without failure")


def test_refusals_at_start(dev_server: DevServer, tmp_path: Path) -> None:
    token = _token(dev_server, tmp_path)
    base = agent_args(
        ca_address=dev_server.address, root_cert=dev_server.root_cert, token_file=token, out_dir=tmp_path / "o"
    )
    # A token for another service account than the one asked for.
    res = run_agent_once([*base, "--service-account", "grafana"])
    assert res.returncode == 2
    assert "apps/grafana does not match the token" in res.stderr
    assert "apps/prom" in res.stderr
    # gen-istio-cert's alias says the same thing.
    res = run_agent_once([*base, "--sa-name", "grafana"])
    assert res.returncode == 2
    assert "does not match the token" in res.stderr
    # A root that does not verify the CA's serving certificate.
    other = pki.make_ca("not the CA's root")
    (tmp_path / "other-root.pem").write_bytes(other.cert_pem)
    res = run_agent_once(
        agent_args(
            ca_address=dev_server.address,
            root_cert=tmp_path / "other-root.pem",
            token_file=token,
            out_dir=tmp_path / "o2",
        )
    )
    assert res.returncode == 1
    # (gRPC's C core may log the handshake failure before our one line.)
    assert res.stderr.splitlines()[-1].startswith("UNAVAILABLE: ")
    assert "--root-cert" in res.stderr
    assert not (tmp_path / "o2" / "key.pem").exists()
    # An output directory that cannot be written (under a regular file: fails for root too).
    (tmp_path / "file").write_text("x")
    res = run_agent_once(
        agent_args(
            ca_address=dev_server.address,
            root_cert=dev_server.root_cert,
            token_file=token,
            out_dir=tmp_path / "file" / "certs",
        )
    )
    assert res.returncode == 2
    assert "--out-dir: cannot create" in res.stderr
    # No output at all.
    res = run_agent_once(agent_args(ca_address=dev_server.address, root_cert=dev_server.root_cert, token_file=token))
    assert res.returncode == 2
    assert "no output" in res.stderr
    # A CA refusal is reported as CODE: message (an expired... here: unknown cluster id).
    res = run_agent_once([*base, "--cluster-id", "elsewhere"])
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1].startswith("UNAUTHENTICATED: ")


def test_read_only_directory_is_refused(dev_server: DevServer, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into 0555 directories; the directory-under-a-file case covers root")
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    res = run_agent_once(
        agent_args(
            ca_address=dev_server.address,
            root_cert=dev_server.root_cert,
            token_file=_token(dev_server, tmp_path),
            out_dir=out,
        )
    )
    assert res.returncode == 2
    assert "not writable" in res.stderr
