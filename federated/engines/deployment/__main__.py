"""`python -m federated.engines.deployment COMMAND ...` (the commands the multi-host guide,
docs/tutorials/three-hospitals.md, gives the coordinator and the hospitals): `superlink` and
`supernode` run Flower's own, tuned (flower_services.py); `clientapp-worker` runs the long-lived
ClientApp process, which, having been started with -m, restarts itself as the clientapp_worker.py
script (it must import nothing of the project before loading the app)."""

import sys

from federated.engines.deployment import flower_services
from federated.engines.deployment.clientapp_worker import main as clientapp_worker_main

COMMANDS = ("superlink", "supernode", "clientapp-worker")
USAGE = f"usage: python -m federated.engines.deployment {{{','.join(COMMANDS)}}} ... (-h for each)"

if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
    print(USAGE)
    sys.exit(0)
if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    got = f"unknown command {sys.argv[1]!r}" if len(sys.argv) >= 2 else "no command"
    sys.exit(f"{USAGE}\nerror: {got}; the commands are {', '.join(COMMANDS)}")
sys.exit(flower_services.main() if sys.argv[1] in ("superlink", "supernode") else clientapp_worker_main())
