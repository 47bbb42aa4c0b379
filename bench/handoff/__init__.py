"""`dfuse bench handoff`: one hop between two processes. command.py (the command and the dfuse
hop), baselines.py (the floors and naive baselines beside it), process_pair.py (how the two
processes are started, pinned and cleaned up)."""
