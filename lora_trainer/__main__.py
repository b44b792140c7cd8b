"""`python -m lora_trainer ...`: the command line."""

import sys

from lora_trainer.hosts.cli import main

sys.exit(main())
