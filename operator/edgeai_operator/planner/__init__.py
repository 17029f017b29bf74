"""The partition planner: pure functions from profiles, links and an SLO to a plan.

No I/O and no ML runtime here: inputs are plain numbers (per-tier compute ms per
node or segment, bytes per tensor or cut, link bandwidth and RTT), so the operator
can plan inside a reconcile loop and tests can check it against brute force.
See `model` for the cost model and `solvers` for the algorithms.
"""

from edgeai_operator.planner.brute import brute_force
from edgeai_operator.planner.model import (
    OBJECTIVES,
    TIER_ORDER,
    Evaluation,
    LayerGraph,
    Link,
    PowerModel,
    Problem,
    Tensor,
    Variant,
    evaluate,
    feasible,
)
from edgeai_operator.planner.plan import (
    Alternative,
    Plan,
    Stage,
    Transfer,
    layer_ranges,
    plan_partitions,
)
from edgeai_operator.planner.solvers import Solution, solve

__all__ = [
    "OBJECTIVES",
    "TIER_ORDER",
    "Alternative",
    "Evaluation",
    "LayerGraph",
    "Link",
    "Plan",
    "PowerModel",
    "Problem",
    "Solution",
    "Stage",
    "Tensor",
    "Transfer",
    "Variant",
    "brute_force",
    "evaluate",
    "feasible",
    "layer_ranges",
    "plan_partitions",
    "solve",
]
