"""What runs inside a stage worker process: the worker loop, the stage kinds, model families."""
