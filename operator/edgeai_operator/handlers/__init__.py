"""kopf handlers, thin: each delegates to the pure or adapter modules.

Importing this package registers the handlers with kopf (see `edgeai_operator.main`);
they reach the process's shared state through kopf's memo (`context.context_of`).
"""

from edgeai_operator.handlers import deployments, models, nodes, training, workloads

__all__ = ["deployments", "models", "nodes", "training", "workloads"]
