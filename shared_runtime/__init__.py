"""The runtime both statecar services share, and the only code they share
besides the state service's client: domain errors and their gRPC status
mapping, interceptors, auth, health, Prometheus gRPC metrics, TLS, the
process lifecycle, identifier validation and the text of openai-agents items.

It depends on neither service; `tests/test_boundaries.py` keeps it that way.
"""
