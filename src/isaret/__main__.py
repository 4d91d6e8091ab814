import sys

from isaret.cli import main

sys.exit(main())
