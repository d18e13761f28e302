import sys

from blazec.cli import main

sys.exit(main())
