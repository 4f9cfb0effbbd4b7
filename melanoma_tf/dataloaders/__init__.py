"""Input pipelines that Model Garden does not have."""
