"""The server side of a run: the round loop (federation.py), the ServerApp, evaluation summaries, typed
results (records.py in memory, results.py as summary.json), callbacks (tracking, checkpoints) and outputs."""
