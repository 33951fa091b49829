"""Job entrypoint: load benchmark of the served app, with and without the drafter, through the openai client.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/bench.py --config CONFIG.yaml [--draft EXPORT_DIR ...]
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("bench"))
