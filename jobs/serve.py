"""Job entrypoint: serve the base with its drafter as an OpenAI-compatible Ray Serve LLM app on this cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/serve.py --config CONFIG.yaml [--draft EXPORT_DIR] --detach
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("serve"))
