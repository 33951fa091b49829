"""Job entrypoint: regenerate assistant turns with the base model into Parquet on the current cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/distill.py --config CONFIG.yaml [section.key=value ...]
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("distill"))
