import sys

from moekit.cli.main import main

sys.exit(main())
