"""Where a run reports: JSON lines, TensorBoard event files and the console."""
