import sys

from diffutron.cli import main

sys.exit(main())
