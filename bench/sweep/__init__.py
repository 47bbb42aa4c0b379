"""`dfuse bench sweep`: the open-loop serving sweep. command.py (the command and the sweep itself),
runners.py (an Engine and the monolithic baseline behind one interface), monolithic.py (that
baseline's processes), traces.py (arrival traces and option parsing), report.py (metrics and the
written files), plots.py (its PNGs)."""
