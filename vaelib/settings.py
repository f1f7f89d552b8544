"""The run's settings: what defines a training run and how it is trained, as one validated object.

:class:`TrainSettings` is what :func:`vaelib.training.fit` trains by, what run.json and the checkpoint record
(:meth:`TrainSettings.recorded`), what a resume is compared with (:func:`vaelib.runs.check_resumable`), and what
``python -m vaelib train`` builds from its options. It is checked once, when it is made.

Not in it, and why: the model and the data (fit's arguments; the record notes the data's size and fingerprint);
where the run is written (out_dir, resume, overwrite); and how and where this session runs it (device, fast,
resident, tf32, progress, callback): these may differ between the sessions of one run (a run stopped on a GPU
resumes on the CPU), so they are fit's keywords, not part of what a resume compares. A custom optimizer factory
stays a keyword of fit too: it is code, which can be neither recorded nor compared (the record says "custom").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from vaelib.objectives import KL_ESTIMATORS, OBJECTIVES, default_kl, has_analytic_kl


def _is_count(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainSettings:
    """What defines a training run (frozen; checked once, in ``__post_init__``).

    epochs: the total number of epochs (when resuming, training continues up to this number).
    batch_size: examples per step.
    lr, lr_final: Adam's step size; with lr_final it decays geometrically from lr (first epoch) to lr_final (last
      epoch), also for a custom optimizer's (:func:`vaelib.training.lr_at_epoch`).
    beta, warmup_epochs: the KL weight and its linear warm-up (:func:`vaelib.objectives.kl_warmup`).
    binarize: True redraws Bernoulli(x) binary data every epoch (Burda et al. 2015); data must be in [0, 1].
    seed: seeds the data permutation (seed), the binarisation (seed + 1) and the run's noise.
    kl: the KL estimator, "analytic" or "mc"; None: "analytic" where the model's prior has a closed form, else "mc"
      (:meth:`for_model` fills it in). It also sets the test ELBO of the history.
    objective: "elbo", or "iwae": the k-sample bound L_k of Burda et al. (2015) (:func:`vaelib.objectives.iwae_bound`)
      with ``k`` importance samples per example (k = 1 is the ELBO with kl="mc"); beta and warm-up do not apply.
    checkpoint_every: write the checkpoint every this many epochs (and after the last one, on Ctrl-C and when
      training diverges: no finished epoch is lost). May change on resume, as epochs may.
    eval_batch_size: examples per batch of the test ELBO computed after each epoch.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_final: float | None = None
    beta: float = 1.0
    warmup_epochs: int = 0
    binarize: bool = False
    seed: int = 0
    kl: str | None = None
    objective: str = "elbo"
    k: int | None = None
    checkpoint_every: int = 1
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("warmup_epochs", 0), ("checkpoint_every", 1),
                          ("eval_batch_size", 1)):
            value = getattr(self, name)
            if not _is_count(value, low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("lr", self.lr), ("lr_final", self.lr_final)):
            if (value is not None or name == "lr") and not (_is_number(value) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (_is_number(self.beta) and self.beta >= 0):  # NaN too; a beta beyond float32's range is allowed
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.kl is not None and self.kl not in KL_ESTIMATORS:
            raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {self.kl!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "iwae":
            if not _is_count(self.k, 1):
                raise ValueError("objective='iwae' needs k, the number of importance samples, an integer >= 1; got "
                                 f"{self.k!r}")
            if self.beta != 1 or self.warmup_epochs:
                raise ValueError("objective='iwae' has no KL weight: beta must be 1 and warmup_epochs 0")
        elif self.k is not None:
            raise ValueError(f"k={self.k!r} is the IWAE bound's number of samples; pass objective='iwae' with it")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> TrainSettings:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def for_model(self, model) -> TrainSettings:
        """These settings with the KL estimator ``model`` takes by default filled in, checked against the model."""
        kl = default_kl(model) if self.kl is None else self.kl
        if kl == "analytic" and not has_analytic_kl(model):
            raise ValueError(f"kl='analytic' needs a closed-form KL, which the prior {type(model.prior).__name__} "
                             "does not have; use kl='mc' (or leave kl unset)")
        return self if kl == self.kl else self.replace(kl=kl)

    def recorded(self, *, n_train: int, data: str, optimizer: str = "adam") -> dict:
        """The ``settings`` of run.json and the checkpoint: what a resume must match (all but
        :data:`vaelib.runs.CHANGEABLE_ON_RESUME`). ``n_train`` and ``data`` (:func:`vaelib.runs.data_fingerprint`)
        describe the training data; ``optimizer`` is "adam" (vaelib's) or "custom" (a factory given to fit).
        Its keys, their order and values are those of every run written so far (tests/test_settings.py pins them):
        old runs resume against them, and the book's reference models are compared with them."""
        if self.kl is None:
            raise ValueError("kl is not set: record the settings for_model(model), which fills in its default")
        return dict(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, lr_final=self.lr_final, beta=self.beta,
                    warmup_epochs=self.warmup_epochs, binarize=bool(self.binarize), seed=self.seed, kl=self.kl,
                    objective=self.objective, k=self.k, n_train=n_train, data=data, optimizer=optimizer)


__all__ = ["TrainSettings"]
