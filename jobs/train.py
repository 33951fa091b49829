"""Job entrypoint: train Medusa heads with Ray Train + DeepSpeed on the current cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/train.py --config CONFIG.yaml train.num_workers=4
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("train"))
