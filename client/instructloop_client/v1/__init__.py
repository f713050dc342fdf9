"""The gRPC stubs of instructloop.v1, generated from protos/ by `make protos` (do not edit the
*_pb2* files: scripts/gen_protos.py writes them)."""
