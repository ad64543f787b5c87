import sys

from triattn_compile.cli import main

sys.exit(main())
