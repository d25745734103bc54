"""`python -m cct_kernels info|bench|profile|train`: see cct_kernels.cli."""
import sys

from cct_kernels.cli import main

sys.exit(main())
