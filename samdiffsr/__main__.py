import sys

from samdiffsr.cli import main

sys.exit(main())
