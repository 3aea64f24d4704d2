"""The shipped recipes, installed as ``ditprune.configs``: ``ditprune prune flux_dev`` finds
``flux_dev.yaml`` here when no such file exists where you run it."""
