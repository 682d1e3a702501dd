"""Placeholder: filled by the issue that adds this technique (no nodes yet)."""
NODES: list = []
