import sys

from tangquant.poet.prepare import main

sys.exit(main())
