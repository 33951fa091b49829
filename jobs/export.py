"""Job entrypoint: export the latest (or a given) training checkpoint as a vLLM/TGI Medusa directory.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/export.py --config CONFIG.yaml [--checkpoint DIR] [--push-to-hub ORG/NAME]
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("export"))
