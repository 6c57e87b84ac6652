"""Serving runtime shared by both statecar services: domain errors and their
gRPC status mapping, interceptors, health, metrics and process lifecycle.

It lives in state_service because agent_service already depends on
state_service (for its client), so both can share it without a third package.
"""
