"""instructloop: an online RLHF service in the InstructGPT mould.

This package holds what serving and training share (paths, the model registry, the default
model's build) and the command line. It imports neither `serving` nor `training` at module level.
"""

__version__ = "0.1.0"
