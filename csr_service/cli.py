"""Command line: ``csr-service serve | dev-token | request | agent``.

Every ``serve`` option is also an environment variable (``CSR_SERVICE_<NAME>``) and a key in
the ``--config`` TOML file; ``--help`` lists each with its default.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from csr_service import __version__
from csr_service.common.durations import parse_duration
from csr_service.common.errors import ConfigError
from csr_service.config import Config, all_options, resolve
from csr_service.pki.keys import KeyType

__all__ = ["main"]

_GROUP_TITLES = {
    "general": "general",
    "server": "gRPC server and TLS",
    "pipeline": "request pipeline",
    "auth": "caller authentication",
    "kubernetes": "Kubernetes API access",
    "controllers": "Kubernetes controllers (root ConfigMaps, leader election, istiod-tls, runtime issuer)",
    "signer": "Kubernetes CSR signer (istiod EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API)",
    "issuer": "issuer selection",
}


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the CA service",
        description="Serve istio.v1.auth.IstioCertificateService. Every option can also be set as an "
        "environment variable (shown in brackets) or in the --config TOML file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also here: the image's entrypoint is `csr-service serve`, so `docker run IMAGE --version` lands here.
    p.add_argument("--version", action="version", version=version_text())
    groups: dict[str, Any] = {}
    for opt in all_options():
        title = _GROUP_TITLES.get(opt.group, f"issuer '{opt.group}'")
        group = groups.setdefault(opt.group, p.add_argument_group(title))
        help_text = f"{opt.help} (default: {opt.describe_default()}) [{opt.env}]"
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": argparse.SUPPRESS, "help": help_text}
        if opt.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = opt.metavar or opt.kind.upper()
        group.add_argument(f"--{opt.name}", **kwargs)


def _dev_defaults(state_dir: str) -> dict[str, Any]:
    from csr_service.service.dev import DEV_ISSUER, prepare_dev_state

    state = prepare_dev_state(state_dir)
    return {
        "grpc-listen": "127.0.0.1:6443",
        # An ephemeral loopback port: several dev servers (tests, benchmarks) can run at once.
        "http-listen": "127.0.0.1:0",
        "serving-dns-names": ("localhost",),
        "serving-ip-addresses": ("127.0.0.1",),
        "local-ca-dir": str(state.ca_dir),
        "jwt-jwks-file": str(state.jwks),
        "jwt-issuer": DEV_ISSUER,
    }


def _is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_config(flag_values: dict[str, Any]) -> Config:
    """Resolve flags/env/file (+ dev defaults) into a validated Config."""
    values = resolve(flag_values)
    if values["dev"]:
        values = resolve(flag_values, defaults=_dev_defaults(values["state-dir"]))
        for key in ("grpc-listen", "insecure-grpc-listen", "http-listen"):
            if values[key] and not _is_loopback(values[key]):
                raise ConfigError(f"--{key}: --dev listens on loopback only, got {values[key]!r}")
    return Config.from_values(values)


def _banner(config: Config, port: int) -> str:
    state = Path(config.state_dir).resolve()
    addr = f"127.0.0.1:{port}"
    return f"""
{version_text()} (dev mode) is serving on {addr} (TLS)

  state directory   {state}
  trust bundle      {state / "root-cert.pem"}   (the root Istio workloads trust)
  CA (cacerts)      {state / "ca"}
  token verify key  {state / "jwks.json"}

Try it:
  csr-service dev-token --state-dir {state} --namespace default --service-account sleep > /tmp/token
  csr-service request --ca-address {addr} --root-cert {state / "root-cert.pem"} --token-file /tmp/token \\
      --trust-domain {config.pipeline.trust_domain} --namespace default --service-account sleep \\
      --out-dir /tmp/sleep-certs
  openssl x509 -in /tmp/sleep-certs/cert-chain.pem -noout -text
"""


def cmd_serve(args: argparse.Namespace) -> int:
    from csr_service.infra.logs import setup_logging
    from csr_service.service.supervisor import run

    flag_values = {o.name: getattr(args, o.dest) for o in all_options() if hasattr(args, o.dest)}
    config = build_config(flag_values)
    setup_logging(config.log_level, config.log_format)

    def ready(port: int) -> None:
        if config.dev:
            print(_banner(config, port), flush=True)
        elif port:
            print(f"{version_text()} serving on port {port}", flush=True)
        else:
            print(f"{version_text()} running without a gRPC service (--grpc-listen is empty)", flush=True)

    return run(config, on_ready=ready)


def cmd_dev_token(args: argparse.Namespace) -> int:
    from csr_service.service.dev import mint_dev_token

    token = mint_dev_token(
        args.state_dir,
        namespace=args.namespace,
        service_account=args.service_account,
        audiences=tuple(a for a in args.audience.split(",") if a),
        ttl=parse_duration(args.ttl),
        pod_name=args.pod_name,
    )
    print(token)
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    from csr_service.client import RequestError, request_certificate

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    try:
        result = request_certificate(
            ca_address=args.ca_address,
            root_cert=Path(args.root_cert),
            token=token,
            trust_domain=args.trust_domain,
            namespace=args.namespace,
            service_account=args.service_account,
            out_dir=Path(args.out_dir),
            key_type=KeyType(args.key_type),
            ttl=parse_duration(args.ttl),
            cluster_id=args.cluster_id or None,
            tls_server_name=args.tls_server_name,
        )
    except RequestError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.out_dir}/key.pem, cert-chain.pem, root-cert.pem for {result.identity} "
        f"(valid until {result.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, {result.chain_len} chain elements)"
    )
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from csr_service.agent.run import run
    from csr_service.agent.settings import AgentSettings

    return run(AgentSettings.from_args(args))


def version_text() -> str:
    """``csr-service <version>``, plus the git commit when the installation was stamped with one.

    The image's build stage writes ``csr_service/BUILD_REVISION`` before building the wheel
    (Dockerfile, build argument REVISION); a checkout or a plain wheel has no such file.
    """
    try:
        revision = resources.files("csr_service").joinpath("BUILD_REVISION").read_text().strip()
    except OSError:
        revision = ""
    return f"csr-service {__version__}" + (f" (revision {revision})" if revision else "")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csr-service", description="An external certificate authority for Istio.")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

    t = sub.add_parser("dev-token", help="print a JWT the dev server accepts (shaped like a projected SA token)")
    t.add_argument("--state-dir", required=True, help="the state directory of `serve --dev`")
    t.add_argument("--namespace", required=True)
    t.add_argument("--service-account", required=True)
    t.add_argument("--audience", default="istio-ca", help="comma-separated audiences (default: istio-ca)")
    t.add_argument("--ttl", default="1h", help="token lifetime (default: 1h)")
    t.add_argument("--pod-name", default=None, help="bind the token to this pod name (kubernetes.io claim)")

    r = sub.add_parser("request", help="obtain a workload certificate the way istio-agent does; write it to files")
    r.add_argument("--ca-address", required=True, metavar="HOST:PORT")
    r.add_argument("--root-cert", required=True, metavar="FILE", help="PEM roots to verify the CA's TLS certificate")
    r.add_argument("--token-file", default=None, metavar="FILE", help="the service-account token (JWT)")
    r.add_argument("--cluster-id", default="Kubernetes", help="sent as clusterid metadata (default: Kubernetes)")
    r.add_argument("--trust-domain", required=True)
    r.add_argument("--namespace", required=True)
    r.add_argument("--service-account", required=True)
    r.add_argument("--key-type", default="ec-p256", choices=["rsa2048", "ec-p256", "ec-p384"])
    r.add_argument("--ttl", default="1h", help="requested lifetime (default: 1h)")
    r.add_argument("--tls-server-name", default=None, help="override the name checked in the CA's certificate")
    r.add_argument("--out-dir", required=True, metavar="DIR", help="where key.pem, cert-chain.pem, root-cert.pem go")

    from csr_service.agent.settings import add_arguments

    a = sub.add_parser(
        "agent",
        help="keep a workload certificate fresh in files and/or a Secret (applications without sidecars)",
        description="Get a workload certificate from an Istio CA (csr-service or istiod) the way istio-agent "
        "does, write it to --out-dir and/or --output-secret, and renew it before it expires, when the root "
        "changes and when the output is deleted or changed. gen-istio-cert's flag names are accepted too.",
    )
    add_arguments(a)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command == "serve":
        # Only as the process's own command line: a caller passing argv runs it in its process.
        from csr_service.infra.malloc import restart_with_malloc_tuning

        restart_with_malloc_tuning()  # returns only when there is nothing to do (or it failed)
    handlers = {"serve": cmd_serve, "dev-token": cmd_dev_token, "request": cmd_request, "agent": cmd_agent}
    try:
        code = handlers[args.command](args)
    except ConfigError as exc:
        print(f"csr-service: configuration error: {exc}", file=sys.stderr)
        code = 2
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"csr-service: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)
