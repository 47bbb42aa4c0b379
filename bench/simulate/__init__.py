"""`dfuse bench simulate`: placement policies on a simulated cluster. command.py (the command),
policy_comparison.py (runs every policy on a scenario and compares them), scenarios.py (the
clusters, models and traces), plots.py (its PNG)."""
