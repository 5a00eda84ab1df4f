import sys

from _parassm_cli import main


sys.exit(main())
