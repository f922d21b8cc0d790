import sys

from denselora_app.cli import main

sys.exit(main())
