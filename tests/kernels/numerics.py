"""What the kernel tests share: where they run and the unit roundoff of each dtype."""

import torch

# On a GPU machine the kernel tests run the compiled kernels; elsewhere the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -20}
