"""vaelib: the companion package of *Variational Autoencoders: Derived, Checked, Trained*."""

from vaelib.config import describe_run, pick, quick_mode, select_device
from vaelib.data import load_split

__version__ = "0.1.0"
__all__ = ["describe_run", "load_split", "pick", "quick_mode", "select_device", "__version__"]
