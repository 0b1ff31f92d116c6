"""``python -m batchnorm.cli``: the same as the ``batchnorm`` command."""

import sys

from . import main

sys.exit(main())
