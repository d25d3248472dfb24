"""Starts the real servers (Kafka, Redis, Triton) as local processes on free loopback ports."""

from services.common.stack.local import LocalStack, StackEndpoints

__all__ = ["LocalStack", "StackEndpoints"]
