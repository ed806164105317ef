"""Internal gRPC: .proto files, generated stubs, mutual TLS and per-RPC identity checks.

See README.md in this directory for the contracts every service must keep.
"""
