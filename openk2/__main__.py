import sys

from openk2.cli import main

sys.exit(main())
