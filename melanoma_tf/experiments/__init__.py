"""Studies that reuse the training task: runnable modules, each writing a JSON and a short report."""
