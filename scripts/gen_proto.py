"""Regenerate the committed Python stubs from proto/ (run: python scripts/gen_proto.py).

The stubs are committed so that installing csr-service needs no grpcio-tools;
tests/unit/test_proto_stubs.py fails when they drift from the .proto source.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "istio/v1/auth/ca.proto"
OUT = ROOT / "csr_service" / "_generated"
FILES = ("ca_pb2.py", "ca_pb2.pyi", "ca_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc into out_dir and return {file name: text} with package-relative imports."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / PROTO),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    gen = out_dir / "istio" / "v1" / "auth"
    texts = {}
    for name in FILES:
        text = (gen / name).read_text()
        # protoc writes absolute imports from the proto root; make them relative
        # so the stubs live inside our package without touching sys.path.
        text = re.sub(r"^from istio\.v1\.auth import ca_pb2", "from . import ca_pb2", text, flags=re.M)
        texts[name] = text
    return texts


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (OUT / name).write_text(text)
    print(f"wrote {', '.join(FILES)} to {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
