"""``python -m fsl_cli``: the ``fsl`` console script without installing it."""

import sys

from fsl_cli.main import main

sys.exit(main())
