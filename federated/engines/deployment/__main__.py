"""`python -m federated.engines.deployment clientapp-worker ...` (the command the README gives
hospitals): the ClientApp worker's command line. Having been started with -m, it restarts
itself as the clientapp_worker.py script, which imports nothing of the project."""

import sys

from federated.engines.deployment.clientapp_worker import main

sys.exit(main())
