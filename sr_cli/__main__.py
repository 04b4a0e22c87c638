import sys

from sr_cli.main import main

sys.exit(main())
