"""The embedded model and task: no download needed."""
