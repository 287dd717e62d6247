"""The server side of a run: the round loop, the ServerApp, evaluation summaries, checkpoints, tracking and outputs."""
