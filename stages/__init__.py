"""What runs inside a stage worker process: the worker loop, the stage kinds, model families."""

STAGE_KINDS = ("encoder", "dit", "decoder")  # pipeline order
