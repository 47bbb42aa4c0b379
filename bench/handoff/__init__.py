"""`dfuse bench handoff`: one hop between two processes. command.py (the command and the dfuse
hop), baselines.py (the floors and naive baselines beside it), process_pair.py (how the two
processes are started, pinned and cleaned up); `--link tcp`: tcp_link.py (one hop between nodes:
SlotServer/SlotClient vs pickle over TCP) and ray_link.py (the same hop through Ray object refs)."""
