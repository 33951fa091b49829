"""Job entrypoint: measure acceptance length and speed-up with vLLM Medusa speculative decoding.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/eval.py --config CONFIG.yaml [--medusa EXPORT_DIR]
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("eval"))
