"""Job entrypoint: distill -> train -> export -> eval on the current cluster, each stage resuming its output.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config CONFIG.yaml [section.key=value ...]
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("pipeline"))
