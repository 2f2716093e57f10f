import sys

from rtserve.cli import main

sys.exit(main())
