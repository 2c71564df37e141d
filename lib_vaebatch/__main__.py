import sys

from lib_vaebatch.cli import main

sys.exit(main())
