"""Generated gRPC and protobuf modules (produced by scripts/gen_proto.py during set-up)."""
