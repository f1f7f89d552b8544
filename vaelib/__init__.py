"""vaelib: the companion package of *Variational Autoencoders: Derived, Checked, Trained*.

The closed forms live in :mod:`vaelib.distributions`, the linear-Gaussian model and pPCA in :mod:`vaelib.linear`,
models in :mod:`vaelib.models`, objectives in :mod:`vaelib.objectives`, training in :mod:`vaelib.training` (its
CUDA-graph stepper in :mod:`vaelib.cuda_graph`, its run directory in :mod:`vaelib.runs`), evaluation in
:mod:`vaelib.evaluation` and figures in :mod:`vaelib.plots` (not imported here, so that importing vaelib does not
import matplotlib).
"""

from vaelib.config import DeviceUnavailableError, describe_run, pick, quick_mode, select_device, set_cpu_threads
from vaelib.data import load_split
from vaelib.evaluation import active_units, encode_means, evaluate_elbo, iwae_bounds, iwae_nll, kl_per_dimension
from vaelib.models import VAE, build_vae
from vaelib.objectives import elbo, iwae_bound
from vaelib.runs import load_run
from vaelib.training import fit

__version__ = "0.1.0"
__all__ = [
    "VAE", "DeviceUnavailableError", "__version__", "active_units", "build_vae", "describe_run", "elbo",
    "encode_means", "evaluate_elbo", "fit", "iwae_bound", "iwae_bounds", "iwae_nll", "kl_per_dimension", "load_run",
    "load_split", "pick", "quick_mode", "select_device", "set_cpu_threads",
]
