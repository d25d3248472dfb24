"""Operator commands: hash banks and index maintenance."""
