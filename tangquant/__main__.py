import sys

from tangquant.cli import main

sys.exit(main())
