import sys

from medusa_ray.cli import main

sys.exit(main())
