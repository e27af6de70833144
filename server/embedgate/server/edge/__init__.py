"""The gRPC edge: protobuf in, protobuf out, errors mapped to status codes once."""
