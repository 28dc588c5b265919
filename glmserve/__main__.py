"""`python -m glmserve serve ...`, the same as the `glmserve` command."""

import sys

from glmserve.cli import main

sys.exit(main())
