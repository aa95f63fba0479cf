"""Integrations with libraries fastkern plugs into (PEFT, TRL), each in its own module."""
