import sys

from neuralode.cli import main

sys.exit(main())
