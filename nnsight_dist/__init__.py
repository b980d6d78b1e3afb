"""nnsight_dist: nnsight-style tracing and intervention for models sharded over ranks.

``import nnsight_dist as nd``; see README.md and docs/ for the tour.
"""

from . import testing
from .distributed.placement import Placement
from .distributed.exchange import broadcast_object, gather_object
from .distributed.topology import Topology, init
from .intervention.envoy import Envoy
from .intervention.eproperty import eproperty
from .intervention.errors import (
    DivergenceError,
    MissedProviderError,
    ModulePathError,
    NNsightError,
    NoGradientError,
    NotTracingError,
    OutOfOrderError,
    RemoteError,
    RouterTimeout,
    TopologyError,
    TraceSetupError,
    TracingSourceError,
    UnsendableObject,
    UnshardableModel,
    WriteShapeError,
)
from .modeling.language_model import LanguageModel, TransformersModel
from .config import CONFIG
from .modeling.nnsight import NNsight
from .engines.plan import Plan, plan
from .intervention.save import save
from .store.collect import collect_activations
from .store.data import split_for_replica
from .store.format import StoreError
from .store.reader import ActivationStore

__version__ = "0.1.0"

__all__ = [
    "Placement",
    "Plan",
    "plan",
    "Topology",
    "broadcast_object",
    "gather_object",
    "init",
    "DivergenceError",
    "Envoy",
    "LanguageModel",
    "MissedProviderError",
    "ModulePathError",
    "NNsight",
    "NNsightError",
    "NoGradientError",
    "NotTracingError",
    "OutOfOrderError",
    "RemoteError",
    "RouterTimeout",
    "TopologyError",
    "TraceSetupError",
    "TracingSourceError",
    "UnsendableObject",
    "UnshardableModel",
    "StoreError",
    "ActivationStore",
    "collect_activations",
    "split_for_replica",
    "WriteShapeError",
    "CONFIG",
    "TransformersModel",
    "eproperty",
    "save",
    "testing",
]
