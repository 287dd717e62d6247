"""Which strategies run under secure aggregation: each declares it on its class (`SECURE`).

Secure aggregation shows the server only the sum of the sites' masked vectors. A strategy class
says whether its aggregation needs no more than such a sum (and of which layout,
strategies/secure_sums.py) or what more it needs; the refusal below reads that declaration and
lists the strategies that work from the registry, so no list of names is kept anywhere else.
"""

from __future__ import annotations

from federated.core.config.schema import ConfigError, ExperimentConfig
from strategies.registry import STRATEGIES
from strategies.secure_sums import SecureSupport, zero_level


def secure_support(name: str) -> SecureSupport:
    """What strategy `name` declares about masked sums."""
    return STRATEGIES.get(name).server.SECURE


def secure_strategies() -> list[str]:
    """The registered strategies whose aggregation works on masked sums, sorted."""
    return sorted(n for n in STRATEGIES.names() if secure_support(n).layout is not None)


def check_secure_strategy(cfg: ExperimentConfig) -> None:
    """Refuse, with the reason its class declares, a strategy that cannot aggregate masked sums,
    and a clip with which the weights could not travel or the unmasked sum could not be checked."""
    sa = cfg.secure_aggregation
    if sa.name == "none":
        return
    support = secure_support(cfg.strategy.name)
    if support.layout is None:
        raise ConfigError(
            f"secure_aggregation={sa.name} cannot run strategy={cfg.strategy.name}: it {support.why_not}, and "
            f"the server sees only the sum of masked updates (it works with {', '.join(secure_strategies())})"
        )
    if sa.clipping_range < 1:
        raise ConfigError(
            "secure_aggregation.clipping_range must be >= 1: a site's weight for each group (<= 1) "
            f"travels in the same clipped range as its update (got {sa.clipping_range})"
        )
    # 0 picks a power of 2 per round: whether 0 quantises exactly is the same for every power of 2
    if zero_level(sa.clipping_range, sa.quantization_range or 2**20) is None:
        raise ConfigError(
            f"secure_aggregation.clipping_range={sa.clipping_range:g} with quantization_range="
            f"{sa.quantization_range}: a zero entry must quantise to an exact level (c x (T / 2c) = T / 2 in "
            "floating point, T even), or the server could not check that the groups no site may send sum to "
            "exactly zero; use e.g. clipping_range 1, 1.5, 2 or 8 and an even (or 0) quantization_range"
        )
