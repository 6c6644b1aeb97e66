"""HierTCN and its baselines. The rule baselines and the per-event evaluation stream live here;
the neural models build only on hiertcn_fast.nn and hiertcn_fast.ops.

``NEURAL_MODELS``: name -> class of every trainable model (HierTCN first), all with the
constructor ``cls(num_items, **sizes)`` and the contract of :mod:`.base`.
"""

from .baselines import HRNN, HierGRU, SessionGRU
from .base import NextItemModel
from .events import HISTORY_SCOPES, EvalEvents, iter_split_events
from .hiertcn import HierTCN
from .history_tcn import HistoryBatch, HistoryTCN, UserHistoryBatcher
from .rules import RULES, MostPopular, RepeatPrevious, RuleModel, TransitionCounts

NEURAL_MODELS = {"hiertcn": HierTCN, "hrnn": HRNN, "hiergru": HierGRU, "session_gru": SessionGRU,
                 "history_tcn": HistoryTCN}

__all__ = ["HISTORY_SCOPES", "EvalEvents", "iter_split_events", "RULES", "MostPopular", "RepeatPrevious",
           "RuleModel", "TransitionCounts", "NextItemModel", "HierTCN", "HierGRU", "HRNN", "SessionGRU",
           "HistoryTCN", "HistoryBatch", "UserHistoryBatcher", "NEURAL_MODELS"]
