"""The splitting engine: no Flower, no data, no particular model.

* :mod:`.groups`: width groups (what can be split) and the spec that maps a plan to tensor positions;
* :mod:`.policies`: index policies, which units each participant holds in a round (one per method);
* :mod:`.slicing`: a participant's sub-model cut from the global state;
* :mod:`.fusion`: overlap-aware aggregation of sub-models back into the global state (all at once, or folded one by one).
"""

from .fusion import RunningMean, SubmodelUpdate, aggregate
from .groups import (
    INPUT_RULES,
    OUTPUT_RULES,
    Axis,
    GroupDecl,
    IndexPlan,
    SplitSpec,
    WidthGroup,
    axis_positions,
    dim_positions,
    resolve_groups,
)
from .policies import (
    Assignment,
    BlockShift,
    DoubleShift,
    FullWidth,
    IndexPolicy,
    OrderedDropout,
    PlanRequest,
    RandomSubset,
    RollingWindow,
    StaticPrefix,
    window_length,
)
from .slicing import flat_positions, plan_widths, slice_state

__all__ = [
    "INPUT_RULES", "OUTPUT_RULES", "Assignment", "Axis", "BlockShift", "DoubleShift", "FullWidth", "GroupDecl", "IndexPlan",
    "IndexPolicy", "OrderedDropout", "PlanRequest", "RandomSubset", "RollingWindow", "RunningMean", "SplitSpec", "StaticPrefix",
    "SubmodelUpdate", "WidthGroup", "aggregate", "axis_positions", "dim_positions", "flat_positions", "plan_widths", "resolve_groups",
    "slice_state", "window_length",
]  # fmt: skip
