import sys

from sparsefast.cli import main

sys.exit(main())
