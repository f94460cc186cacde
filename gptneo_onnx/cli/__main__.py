import sys

from gptneo_onnx.cli import main

sys.exit(main())
