"""The embedgate gateway server.

Three layers, imports flowing downward only:

- ``edge``: protobuf in, protobuf out; request validation with field paths; domain
  errors mapped to gRPC status codes with ``google.rpc`` details, once.
- ``routing``: model name to provider; batching limits, ordering, post-processing.
- ``providers``: one module per dialect (the embedded ``local`` model first).
"""
