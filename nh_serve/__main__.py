import sys

from nh_serve.cli import main

sys.exit(main())
