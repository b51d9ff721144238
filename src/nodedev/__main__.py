import sys

from nodedev.cli import main

sys.exit(main())
