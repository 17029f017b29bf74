"""kopf handlers, thin: each delegates to the pure or adapter modules.

Importing this package registers the handlers with kopf (see `edgeai_operator.main`).
"""

from edgeai_operator.handlers import deployments, models, nodes, workloads

__all__ = ["deployments", "models", "nodes", "workloads"]
