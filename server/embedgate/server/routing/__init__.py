"""Routing: which provider serves a model, in what batches, and how its raw vectors
become what the caller asked for (size, normalisation, order)."""
