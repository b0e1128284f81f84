"""``python -m backprop <command>``: see :mod:`backprop.cli`."""
import sys

from backprop.cli import main

sys.exit(main())
