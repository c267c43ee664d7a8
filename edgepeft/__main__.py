import sys

from edgepeft.cli import main

sys.exit(main())
