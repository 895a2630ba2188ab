"""Logging, and later metrics and health."""
