"""Generated protobuf/gRPC stubs for istio.v1.auth (do not edit; see scripts/gen_proto.py)."""
