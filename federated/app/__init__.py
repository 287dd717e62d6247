"""The top layer: the command line, the experiment runner, studies and benchmarks.

The app is where the layers are composed: importing it imports the strategies package, which
registers every strategy's settings with the config loader (federated/core cannot import
strategies/ itself, so a process that loads a config imports strategies first).
"""

import strategies  # noqa: F401  (registers the strategies' settings with the config loader)
