"""Stream builders: pure functions of (dataset, options, seed)."""

from clsim.streams.class_incremental import class_incremental

STREAM_BUILDERS = {"class_incremental": class_incremental}

__all__ = ["STREAM_BUILDERS", "class_incremental"]
