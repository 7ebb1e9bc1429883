import sys

from charbuild.cli import main

sys.exit(main())
