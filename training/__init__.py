"""Supermask training and GLUE evaluation (Radiya-Dixit & Wang 2020).

This package's top level imports no torch, so command lines can name its
choices without loading the training stack.
"""

# Deterministic mask written to a bundle after training (TrainConfig.mask_rule):
# "sign" is μ = 1[ν > 0] = 1[σ(ν) > 0.5] (ours: the paper reports the mean of 10 Bernoulli samples and states no
# deterministic rule); "expected" is 1[ν > τ] with one global τ that
# prunes the expected sparsity of the sampled masks trained with, mean(1 − σ(ν)); "sampled" is one draw
# μ ~ Bern(σ(ν)) fixed by the run's seed, a single member of the distribution the network trained under.
MASK_RULES = ("sign", "expected", "sampled")

# Straight-through estimator of the mask scores' gradient (TrainConfig.ste): "identity" is the paper's,
# dL/dν := dL/dμ (Radiya-Dixit & Wang 2020, Section 3.3); "sigmoid" scales it by the derivative of the
# Bernoulli mean, dL/dν := dL/dμ · σ(ν)(1 − σ(ν)) (as in Zhou et al. 2019's supermask training): an option
# of ours. Under AdamW (how ν is trained here) a per-weight scale that changes slowly is mostly divided out
# again (the step is m/√v), so expect it to matter less than under SGD.
STE_KINDS = ("identity", "sigmoid")

# How a Bernoulli evaluation draws its masks (training.trainer.evaluate_bernoulli): "batch", a
# fresh mask per batch of examples (every recorded run so far); "mask", one mask per sample.
BERNOULLI_PER = ("batch", "mask")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError("<name> must be one of a, b, got 'x'")`` unless ``value`` is in ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
