"""The server side of a run: the round loop (loop.py, with handshake.py, schedule.py, round.py), the
ServerApp, evaluation summaries, typed results (records.py in memory, results.py as summary.json),
callbacks (tracking, checkpoints) and outputs."""
