"""HierTCN and its baselines. The rule baselines and the per-event evaluation stream live here;
the neural models build only on hiertcn_fast.nn and hiertcn_fast.ops."""

from .events import HISTORY_SCOPES, EvalEvents, iter_split_events
from .rules import RULES, MostPopular, RepeatPrevious, RuleModel, TransitionCounts

__all__ = ["HISTORY_SCOPES", "EvalEvents", "iter_split_events", "RULES", "MostPopular", "RepeatPrevious",
           "RuleModel", "TransitionCounts"]
