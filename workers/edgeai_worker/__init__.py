"""Inference and training workers for edgeai-operator (never import edgeai_operator)."""
