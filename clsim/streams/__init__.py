"""Stream builders: pure functions of (dataset, options, seed), one module per family."""

from clsim.streams.class_incremental import ClassIncrementalOptions, class_incremental
from clsim.streams.common import TIMING_KEYS, StreamType, TimingOptions
from clsim.streams.few_shot import FewShotOptions, few_shot
from clsim.streams.hierarchical import HierarchicalOptions, hierarchical
from clsim.streams.task_agnostic import TASK_AGNOSTIC_TYPES


def _avalanche_type() -> StreamType:
    # the module imports avalanche-lib only when a stream is built (it is optional)
    from clsim.interop.avalanche import AvalancheStreamOptions, avalanche_stream

    return StreamType(
        avalanche_stream, AvalancheStreamOptions,
        "an Avalanche generator over the dataset (needs avalanche-lib: make venv-avalanche)",
    )


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
    "avalanche": _avalanche_type(),
}

__all__ = ["STREAM_TYPES", "TIMING_KEYS", "StreamType", "TimingOptions", "class_incremental"]
