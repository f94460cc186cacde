"""`python -m gptneo_onnx ...` runs the `gptneo-onnx` command line."""

import sys

from gptneo_onnx.cli import main

sys.exit(main())
