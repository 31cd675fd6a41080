"""`python -m seed_core.data plan ...`: see `seed_core.data.plan`."""

import sys

from seed_core.data.plan import main

sys.exit(main())
