import sys

from clm.aot import main

sys.exit(main())
