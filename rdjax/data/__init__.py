"""Input pipelines: dataset builders, preprocessing and batching."""
