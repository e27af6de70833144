"""Providers: one module per dialect, each turning a batch of inputs into vectors.

A provider knows nothing of gRPC or protobuf; it speaks domain values only.
"""
