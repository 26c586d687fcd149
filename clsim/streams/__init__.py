"""Stream builders: pure functions of (dataset, options, seed), one module per family."""

from clsim.streams.avalanche import AvalancheStreamOptions, avalanche_stream
from clsim.streams.class_incremental import ClassIncrementalOptions, class_incremental
from clsim.streams.common import TIMING_KEYS, StreamType, TimingOptions
from clsim.streams.domain_incremental import DOMAIN_INCREMENTAL_TYPES
from clsim.streams.few_shot import FewShotOptions, few_shot
from clsim.streams.hierarchical import HierarchicalOptions, hierarchical
from clsim.streams.task_agnostic import TASK_AGNOSTIC_TYPES

STREAM_TYPES: dict[str, StreamType] = {
    "class_incremental": StreamType(
        class_incremental, ClassIncrementalOptions, "disjoint class groups, one per experience"
    ),
    "hierarchical": StreamType(
        hierarchical, HierarchicalOptions, "labels expand coarse to fine (HLE), online"
    ),
    "few_shot": StreamType(
        few_shot, FewShotOptions, "a base session, then N-way K-shot sessions"
    ),
    **TASK_AGNOSTIC_TYPES,
    **DOMAIN_INCREMENTAL_TYPES,
    "avalanche": StreamType(
        avalanche_stream, AvalancheStreamOptions,
        "an Avalanche generator over the dataset (needs avalanche-lib: make venv-avalanche)",
    ),
}

__all__ = ["STREAM_TYPES", "TIMING_KEYS", "StreamType", "TimingOptions", "class_incremental"]
