"""The committed stubs match proto/ and the proto matches Istio's wire contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from csr_service._generated import ca_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec
    assert spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    for name, text in fresh.items():
        committed = (ROOT / "csr_service" / "_generated" / name).read_text()
        assert committed == text, f"{name} is stale: run `make proto`"


def test_wire_contract_matches_istio() -> None:
    fd = ca_pb2.DESCRIPTOR
    assert fd.package == "istio.v1.auth"
    req = fd.message_types_by_name["IstioCertificateRequest"]
    assert {f.name: f.number for f in req.fields} == {"csr": 1, "validity_duration": 3, "metadata": 4}
    assert req.fields_by_name["metadata"].message_type.full_name == "google.protobuf.Struct"
    resp = fd.message_types_by_name["IstioCertificateResponse"]
    assert {f.name: f.number for f in resp.fields} == {"cert_chain": 1}
    method = fd.services_by_name["IstioCertificateService"].methods_by_name["CreateCertificate"]
    assert method.input_type is req
    assert method.output_type is resp
